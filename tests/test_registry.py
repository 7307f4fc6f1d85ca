"""Registration: components are found by name from configs that only add
`custom_imports`, and other projects can extend the ATTACKS registry."""

import textwrap

import pytest


def test_config_with_only_custom_imports_builds_our_components(
    tmp_path, run_tool, synthetic_root
):
    # A fresh interpreter that never imports mmseg_robust itself: only the
    # config's custom_imports may register our components.
    cfg = tmp_path / 'user_cfg.py'
    cfg.write_text(
        textwrap.dedent(f"""
        default_scope = 'mmseg'
        custom_imports = dict(imports=['mmseg_robust'],
                              allow_failed_imports=False)
        dataset = dict(type='SyntheticShapesDataset', data_root='{synthetic_root}',
                       generator_cfg=dict(splits=dict(train=48, val=16)),
                       data_prefix=dict(img_path='img_dir/val',
                                        seg_map_path='ann_dir/val'),
                       pipeline=[])
        """)
    )
    script = textwrap.dedent(f"""
        import sys
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from mmseg.registry import DATASETS
        assert 'mmseg_robust' not in sys.modules
        cfg = Config.fromfile('{cfg}')
        init_default_scope(cfg.default_scope)
        ds = DATASETS.build(cfg.dataset)
        print('BUILT', type(ds).__name__, len(ds))
        """)
    out = run_tool(['python', '-c', script], cwd=str(tmp_path))
    assert 'BUILT SyntheticShapesDataset 16' in out


def test_without_custom_imports_the_name_is_unknown(tmp_path, run_tool):
    script = textwrap.dedent("""
        from mmengine.registry import init_default_scope
        from mmseg.registry import DATASETS
        init_default_scope('mmseg')
        try:
            DATASETS.build(dict(type='SyntheticShapesDataset'))
        except KeyError as e:
            print('UNKNOWN', e)
        """)
    out = run_tool(['python', '-c', script], cwd=str(tmp_path))
    assert 'UNKNOWN' in out


def test_registries_are_mmseg_own():
    import mmseg.registry as mmseg_registry

    import mmseg_robust.registry as ours

    for name in (
        'MODELS',
        'LOOPS',
        'HOOKS',
        'METRICS',
        'OPTIM_WRAPPERS',
        'DATASETS',
        'TRANSFORMS',
    ):
        assert getattr(ours, name) is getattr(mmseg_registry, name)
    from mmseg_robust.datasets import SyntheticShapesDataset

    assert ours.DATASETS.get('SyntheticShapesDataset') is SyntheticShapesDataset


def test_other_project_registers_an_attack():
    from mmseg_robust.registry import ATTACKS

    @ATTACKS.register_module(name='UserNoiseAttack_test')
    class UserNoiseAttack:
        def __init__(self, eps=1.0):
            self.eps = eps

    try:
        attack = ATTACKS.build(dict(type='UserNoiseAttack_test', eps=3.0))
        assert isinstance(attack, UserNoiseAttack) and attack.eps == 3.0
        # Our own attacks live in the same registry (imported lazily).
        assert 'UserNoiseAttack_test' in ATTACKS.module_dict
    finally:
        ATTACKS.module_dict.pop('UserNoiseAttack_test')
    with pytest.raises(KeyError):
        ATTACKS.build(dict(type='UserNoiseAttack_test'))
