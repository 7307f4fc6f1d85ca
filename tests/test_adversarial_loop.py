"""The adversarial test loop's attack settings, on a tiny mmseg model without a
Runner: the attacks ignore what the decode head ignores, and each attack's
results are recorded under its own name (two attacks of one class together)."""

from types import SimpleNamespace

import pytest
import torch

from mmseg_robust.engine import AdversarialTestLoop

K = 4
SIZE = 16


@pytest.fixture
def segmentor(tiny_models, attack_one_thread):
    """A tiny PSPNet whose decode head ignores label 254 (not mmseg's 255)."""
    from mmengine.config import ConfigDict
    from mmengine.registry import init_default_scope

    from mmseg_robust.registry import MODELS

    init_default_scope('mmseg')
    cfg = tiny_models.tiny_segmentor_cfg(dict(type='PSPHead', ignore_index=254), K)
    model = MODELS.build(ConfigDict(cfg))
    return tiny_models.trained_like(model).eval()


def _loop(model, attacks, eps=8):
    """The loop as the Runner builds it, on a stand-in for the Runner (the loop
    reads ``runner.model``; no dataloader or evaluator is used here)."""
    runner = SimpleNamespace(model=model, visualizer=SimpleNamespace())
    dataloader = SimpleNamespace(dataset=SimpleNamespace(metainfo={}))
    return AdversarialTestLoop(
        runner,
        dataloader,
        SimpleNamespace(metrics=[]),
        attacks=attacks,
        eps=eps,
        resume=False,
        self_checks=False,
    )


def _view(model, n=2, seed=0):
    """The view of :func:`_batch`'s batch."""
    from mmseg_robust.models import SegmentorPixelView

    batch, keys = _batch(n, seed)
    return SegmentorPixelView(model, batch), keys


def _batch(n=2, seed=0):
    """A data batch of ``n`` images whose labels hold the head's ignore index
    254 on a quarter of the pixels."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        s = SegDataSample(
            metainfo=dict(
                img_path=f'img{i}.png', ori_shape=(SIZE, SIZE), img_shape=(SIZE, SIZE)
            )
        )
        label = torch.randint(0, K, (1, SIZE, SIZE), generator=g)
        label[:, : SIZE // 2, : SIZE // 2] = 254
        s.gt_sem_seg = PixelData(data=label)
        samples.append(s)
    inputs = [
        torch.randint(0, 256, (3, SIZE, SIZE), generator=g, dtype=torch.uint8)
        for _ in range(n)
    ]
    keys = [s.metainfo['img_path'] for s in samples]
    return dict(inputs=inputs, data_samples=samples), keys


def test_attacks_ignore_the_decode_heads_ignore_index(segmentor):
    loop = _loop(segmentor, [dict(type='APGD', steps=2)])
    (attack,) = loop.robustness.attacks[8.0]
    assert attack.ignore_index == 254
    view, keys = _view(segmentor)
    # with the attack's default 255, label 254 would be a class outside [0, K)
    records = [r.to_json() for r in loop.robustness.evaluate(view, keys).records]
    valid = SIZE * SIZE - (SIZE // 2) ** 2
    for rec in records:
        assert rec['clean']['valid'] == valid
        assert rec['attacks']['8']['APGD-CE']['valid'] == valid
    with pytest.raises(ValueError, match='the decode head ignores 254'):
        _loop(segmentor, [dict(type='APGD', steps=2, ignore_index=255)])
    # the head's own value may be repeated
    assert _loop(segmentor, [dict(type='APGD', ignore_index=254)]).robustness.attacks


def test_two_attacks_of_one_class_are_recorded_under_their_names(segmentor):
    """Two APGDs with different losses, PGD beside the SegPGD preset's PGD and a
    named attack: one record each; the same name twice is refused at build."""
    loop = _loop(
        segmentor,
        [
            dict(type='APGD', steps=2, loss='CE'),
            dict(type='APGD', steps=2, loss='JS-Avg'),
            dict(type='PGD', steps=2),
            dict(type='PGD', steps=2, loss='SegPGD', best_iterate=True),
            dict(type='PGD', steps=3, name='PGD-3'),
        ],
    )
    view, keys = _view(segmentor)
    result = loop.robustness.evaluate(view, keys, examples=True)
    records = [r.to_json() for r in result.records]
    examples = result.examples
    names = ['APGD-CE', 'APGD-JS-Avg', 'PGD-CE', 'PGD-SegPGD', 'PGD-3']
    for rec, ex in zip(records, examples):
        assert list(rec['attacks']['8']) == names
        assert ex[8.0].attack in names
    for twice, name in (
        ([dict(type='APGD', loss='CE'), dict(type='APGD', steps=50)], 'APGD-CE'),
        ([dict(type='PGD'), dict(type='BIM', name='PGD-CE')], 'PGD-CE'),
        (
            [
                dict(type='SEA', class_weights=[0.25] * K),
                dict(type='APGDLargeEps', loss='JS-Avg', name='APGD-JS-Avg'),
            ],
            'APGD-JS-Avg',
        ),
    ):
        with pytest.raises(ValueError, match=f"record their results as '{name}'"):
            _loop(segmentor, twice)
    # two SEA settings together: a name prefixes the members
    loop = _loop(
        segmentor,
        [
            dict(type='SEA', steps=3, class_weights=[0.25] * K),
            dict(type='SEA', steps=6, class_weights=[0.25] * K, name='SEA-6'),
        ],
    )
    assert loop.robustness.attacks[8.0][1].record_names()[0] == 'SEA-6:APGD-Mask-CE-Bal'


# ----------------------------------------------------- end to end, tools/test.py
def test_two_apgds_with_different_losses_through_tools_test(
    run_tool, small_config, synthetic_root, data_options, tmp_path
):
    """Two APGDs in one evaluation: the results file, the cache and the report
    carry both, each under its name."""
    import glob
    import json
    import os.path as osp

    from mmengine.config import Config, ConfigDict
    from mmengine.registry import init_default_scope

    from mmseg_robust.registry import MODELS
    from mmseg_robust.reporting import load_result, write_report

    attacks = [
        dict(type='APGD', steps=2, loss='CE'),
        dict(type='APGD', steps=2, loss='JS-Avg'),
    ]
    cfg = tmp_path / 'two_apgds.py'
    cfg.write_text(
        f'_base_ = [{small_config!r}]\n'
        f"test_cfg = dict(_delete_=True, type='AdversarialTestLoop', eps=[8],\n"
        f'                attacks={attacks!r})\n'
        "test_evaluator = dict(_delete_=True, type='RobustnessMetric', name='APGD')\n"
    )
    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = MODELS.build(ConfigDict(Config.fromfile(small_config).model))
    ckpt = str(tmp_path / 'random.pth')
    torch.save(dict(state_dict=model.state_dict(), meta={}), ckpt)
    work = str(tmp_path / 'work')
    run_tool(
        ['python', 'tools/test.py', str(cfg), ckpt, '--work-dir', work]
        + ['--cfg-options', 'test_dataloader.dataset.indices=2']
        + data_options(synthetic_root)
    )
    (path,) = glob.glob(osp.join(work, 'robustness_*.json'))
    with open(path) as f:
        result = json.load(f)
    per_attack = result['summary']['eps']['8']['attacks']
    assert list(per_attack) == ['APGD-CE', 'APGD-JS-Avg']
    assert 'eps8/APGD-JS-Avg/mIoU' in result['metrics']
    (cache,) = glob.glob(osp.join(work, 'robustness_cache', '*', 'rank0.jsonl'))
    text = open(cache).read()
    assert '"APGD-CE"' in text and '"APGD-JS-Avg"' in text
    md = write_report([load_result(result)], str(tmp_path / 'r'), print_table=False)
    report = open(md['markdown']).read()
    assert 'APGD-CE' in report and 'APGD-JS-Avg' in report


class _Loader(list):
    dataset = property(lambda self: self)


def test_examples_only_when_a_hook_asks_flags_in_the_outputs(segmentor):
    """run_iter's outputs carry each image's record and the batch's flags (the
    metric's only input); the adversarial examples, as tensors, only when a
    hook asks for them."""
    from mmseg_robust.evaluation import Example

    batch, keys = _batch()
    processed = []

    def run(hooks, self_checks):
        runner = SimpleNamespace(
            model=segmentor,
            hooks=hooks,
            call_hook=lambda *a, **k: None,
            work_dir='unused',
            timestamp='t',
        )
        loop = AdversarialTestLoop(
            runner,
            _Loader([batch]),
            SimpleNamespace(
                metrics=[],
                process=lambda data_samples, data_batch: processed.append(data_samples),
            ),
            attacks=[dict(type='PGD', steps=1)],
            eps=8,
            resume=False,
            self_checks=self_checks,
        )
        loop.run_iter(0, batch)
        return processed[-1]

    outputs = run([], self_checks=False)
    assert [o.robustness['key'] for o in outputs] == keys
    assert all(o.adv_examples is None and o.robustness_flags is None for o in outputs)
    hook = SimpleNamespace(needs_adv_examples=True)
    outputs = run([hook], self_checks=True)
    for o in outputs:
        (example,) = o.adv_examples.values()
        assert isinstance(example, Example) and torch.is_tensor(example.adv_image)
        assert example.attack == 'PGD-CE' and o.robustness_flags is not None
