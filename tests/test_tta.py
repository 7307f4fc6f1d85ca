"""``tools/test.py --tta`` (mmseg's test-time augmentation) on the synthetic
config: the same numbers as mmseg's own ``tools/test.py --tta`` on the same
checkpoint (the checkpoint fit check looks inside the TTA wrapper, as mmengine's
loading does), and refused with a message when an attack evaluator is set."""

import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def random_checkpoint(small_config, tmp_path_factory):
    """A checkpoint of the synthetic config's model with random weights (seeded,
    spread wider than the init so the predictions vary over the image)."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    import mmseg_robust.models  # noqa: F401  (registers the models)
    from mmseg_robust.models.checkpoint import save_checkpoint
    from mmseg_robust.registry import MODELS

    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(Config.fromfile(small_config).model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    path = str(tmp_path_factory.mktemp('tta') / 'model.pth')
    return save_checkpoint(path, model.state_dict(), {})


def _metrics(output):
    """The (aAcc, mIoU, mAcc) lines of mmseg's test log, in order."""
    return re.findall(
        r'Iter\(test\) \[\d+/\d+\]\s+aAcc: ([\d.]+)\s+mIoU: ([\d.]+)\s+mAcc: ([\d.]+)',
        output,
    )


def test_tta_as_in_mmseg(
    run_tool,
    small_config,
    random_checkpoint,
    synthetic_root,
    data_options,
    repo_root,
    tmp_path,
):
    import mmseg

    stock = osp.join(osp.dirname(mmseg.__file__), '.mim', 'tools', 'test.py')
    options = data_options(synthetic_root) + [
        'test_dataloader.dataset.indices=2',
        'test_dataloader.batch_size=2',
    ]
    runs = []
    for i, tool in enumerate((stock, 'tools/test.py')):
        runs += [':::', tool, small_config, random_checkpoint, '--tta']
        runs += ['--work-dir', str(tmp_path / f'work{i}'), '--cfg-options']
        runs += options
    out = run_tool(
        ['python', 'tests/tools_in_one_process.py'] + runs[1:], cwd=repo_root
    )
    (mmseg_tta, ours_tta) = _metrics(out)
    assert ours_tta == mmseg_tta


def test_fit_check_looks_inside_the_tta_wrapper(small_config):
    """The fit check compares the checkpoint with the segmentor inside mmseg's
    ``SegTTAModel``, where mmengine loads it: a fitting file passes, a file
    with a tensor missing is still refused."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    import mmseg_robust.models  # noqa: F401  (registers the models)
    from mmseg_robust.models.checkpoint import (
        CheckpointError,
        check_state_dict,
        expected_shapes,
    )
    from mmseg_robust.registry import MODELS

    cfg = Config.fromfile(small_config)
    with DefaultScope.overwrite_default_scope('mmseg'):
        tta = MODELS.build(dict(cfg.tta_model, module=cfg.model))
    state = tta.module.state_dict()
    expected = expected_shapes(tta)
    assert list(expected) == list(state)
    check_state_dict(state, expected)
    name = next(iter(state))
    del state[name]
    with pytest.raises(CheckpointError, match=re.escape(name)):
        check_state_dict(state, expected)


def test_tta_refused_with_an_attack_evaluator(
    small_config, random_checkpoint, synthetic_root, data_options, tmp_path
):
    args = [
        sys.executable,
        'tools/test.py',
        small_config,
        random_checkpoint,
        '--tta',
        '--work-dir',
        str(tmp_path / 'work'),
        '--cfg-options',
        'evaluator=SEA',
        'evaluator.eps=8',
        'evaluator.steps=2',
        *data_options(synthetic_root),
        'test_dataloader.dataset.indices=2',
    ]
    proc = subprocess.run(
        args,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert '--tta is not supported with an attack evaluator' in proc.stdout
    assert 'no single perturbation of the image reaches every augmented view' in (
        proc.stdout
    )
    assert 'Traceback' not in proc.stdout


def test_tta_needs_the_tta_pipeline(small_config):
    from mmengine.config import Config

    from mmseg_robust.engine import configure_test

    cfg = Config.fromfile(small_config)
    cfg.pop('tta_pipeline')
    with pytest.raises(
        SystemExit, match='--tta needs `tta_pipeline`.*lacks tta_pipeline'
    ):
        configure_test(cfg, tta=True)
