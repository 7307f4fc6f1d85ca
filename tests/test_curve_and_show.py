"""The robustness-curve tool and ``tools/test.py --show-dir`` with an attack
evaluator, end to end on the small model and the small synthetic split."""

import glob
import json
import os.path as osp

import numpy as np
import pytest


def test_robustness_curve_tool(
    run_tool, small_config, small_checkpoint, synthetic_root, data_options, tmp_path
):
    work = str(tmp_path / 'curve')
    out = run_tool(
        [
            'python',
            'tools/analysis_tools/robustness_curve.py',
            small_config,
            small_checkpoint,
            '--eps',
            '0',
            '2',
            '8',
            '--n-iter',
            '6',
            '--num-images',
            '8',
            '--name',
            'tiny',
            '--work-dir',
            work,
            '--cfg-options',
            'test_dataloader.batch_size=4',
        ]
        + data_options(synthetic_root)
    )
    report = osp.join(work, 'robustness_curve')
    for name in ('report.md', 'report.json', 'robustness_curve.png'):
        assert osp.isfile(osp.join(report, name)), name
    with open(osp.join(report, 'report.json')) as f:
        rows = json.load(f)['models']
    assert len(rows) == 1 and rows[0]['name'] == 'tiny'
    row = rows[0]
    assert row['num_images'] == 8 and row['steps'] == 6
    assert list(row['eps']) == ['2', '8']
    # the curve agrees with the evaluation's own JSON and is non-increasing
    result = json.load(open(glob.glob(osp.join(work, 'robustness_*.json'))[0]))
    worst = result['summary']['eps']['8']['worst_case']
    assert row['eps']['8']['mIoU'] == pytest.approx(worst['mIoU'], abs=0.01)
    assert row['eps']['8']['aAcc'] == pytest.approx(worst['aAcc_img'], abs=0.01)
    curve = [row['clean']['aAcc'], row['eps']['2']['aAcc'], row['eps']['8']['aAcc']]
    assert curve == sorted(curve, reverse=True)
    # the table is printed, and where the outputs went
    assert 'tiny' in out and '8/255' in out
    for what, name in (
        ('markdown', 'report.md'),
        ('json', 'report.json'),
        ('plot', 'robustness_curve.png'),
    ):
        assert f'{what}: {osp.join(report, name)}' in out
    results_file = glob.glob(osp.join(work, 'robustness_*.json'))[0]
    assert f'results file: {results_file}' in out


def test_curve_tool_refuses_no_positive_eps(run_tool, small_config, small_checkpoint):
    with pytest.raises(AssertionError, match='at least one radius > 0'):
        run_tool(
            [
                'python',
                'tools/analysis_tools/robustness_curve.py',
                small_config,
                small_checkpoint,
                '--eps',
                '0',
            ]
        )


def test_show_dir_saves_adversarial_examples(
    run_tool, small_config, small_checkpoint, synthetic_root, data_options, tmp_path
):
    from mmseg_robust.reporting import load_example

    show = str(tmp_path / 'show')
    run_tool(
        [
            'python',
            'tools/test.py',
            small_config,
            small_checkpoint,
            '--work-dir',
            str(tmp_path / 'sea'),
            '--show-dir',
            show,
            '--cfg-options',
            'evaluator=SEA',
            'evaluator.eps=[2,8]',
            'evaluator.n_iter=6',
            'test_dataloader.dataset.indices=4',
            'test_dataloader.batch_size=2',
        ]
        + data_options(synthetic_root)
    )
    arrays = sorted(glob.glob(osp.join(show, '*_example.npz')))
    assert len(arrays) == 4
    for path in arrays:
        stem = path[: -len('_example.npz')]
        # mmseg's visualizer drawing (GT | adversarial prediction, side by side)
        # and the six-panel picture
        for png in (stem + '.png', stem + '_panels.png'):
            with open(png, 'rb') as f:
                assert f.read(8) == b'\x89PNG\r\n\x1a\n'
        ex = load_example(path)
        assert ex['eps'] == 8.0
        assert ex['attack'].startswith('APGD-')
        # the saved adversarial image is the attacked one: in the eps-ball and
        # the pixel range, and its prediction is no better than the clean one
        delta = np.abs(ex['adv_image'] - ex['image'])
        assert delta.max() <= 8 / 255 + 1e-5
        assert ex['adv_image'].min() >= 0 and ex['adv_image'].max() <= 1
        assert ex['adv_acc'] <= ex['clean_acc']
        gt = ex['gt']
        valid = gt != 255
        acc = ((ex['adv_pred'] == gt) & valid).sum() / max(valid.sum(), 1)
        assert acc == pytest.approx(ex['adv_acc'])
        clean_acc = ((ex['clean_pred'] == gt) & valid).sum() / max(valid.sum(), 1)
        assert clean_acc == pytest.approx(ex['clean_acc'])
    # the adversarial JSON is written as without --show-dir
    assert glob.glob(str(tmp_path / 'sea' / 'robustness_*.json'))
    # rerun in the same work dir: the images come from the cache, are not
    # attacked again and have no example; the log says so and how to draw them
    show2 = str(tmp_path / 'show2')
    out = run_tool(
        [
            'python',
            'tools/test.py',
            small_config,
            small_checkpoint,
            '--work-dir',
            str(tmp_path / 'sea'),
            '--show-dir',
            show2,
            '--cfg-options',
            'evaluator=SEA',
            'evaluator.eps=[2,8]',
            'evaluator.n_iter=6',
            'test_dataloader.dataset.indices=4',
            'test_dataloader.batch_size=2',
        ]
        + data_options(synthetic_root)
    )
    assert not glob.glob(osp.join(show2, '*_example.npz'))
    assert '4 images were restored from the robustness cache' in out
    assert 'evaluator.resume=False' in out
    assert 'draw is False' not in out


def test_show_dir_needs_an_adversarial_loop(repo_root):
    from types import SimpleNamespace

    from mmengine.config import Config

    from mmseg_robust.engine import (
        AdversarialVisualizationHook,
        add_adversarial_visualization,
        apply_robustness_evaluator,
        is_robustness_evaluation,
    )

    cfg = Config.fromfile(
        osp.join(repo_root, 'configs/synthetic/upernet_convnext-micro_synthetic.py')
    )
    assert not is_robustness_evaluation(cfg)
    apply_robustness_evaluator(cfg, dict(type='PGD', eps=[4]))
    assert is_robustness_evaluation(cfg)
    add_adversarial_visualization(cfg, 'out')
    # mmseg's hook would draw the clean input: removed; ours draws the attacked
    # one
    assert 'visualization' not in cfg.default_hooks
    assert cfg.custom_hooks[-1]['type'] == 'AdversarialVisualizationHook'
    # a plain TestLoop has no adversarial examples to save: a clear error
    hook = AdversarialVisualizationHook(out_dir='out')
    runner = SimpleNamespace(test_loop=SimpleNamespace())
    with pytest.raises(ValueError, match='needs an adversarial test loop'):
        hook.before_test(runner)


def test_evaluator_name_with_options_on_the_command_line():
    from mmseg_robust.engine import normalize_evaluator_options

    # `evaluator=SEA evaluator.eps=4,8`: mmengine would try to set .eps on 'SEA'
    got = normalize_evaluator_options(
        {'evaluator': 'SEA', 'evaluator.eps': [4, 8], 'x': 1}
    )
    assert got == {'evaluator.type': 'SEA', 'evaluator.eps': [4, 8], 'x': 1}
    # alone, or with evaluator.type given, nothing changes
    assert normalize_evaluator_options({'evaluator': 'SEA'}) == {'evaluator': 'SEA'}
    assert normalize_evaluator_options(None) is None


def test_out_with_an_attack_evaluator(
    run_tool, small_config, small_checkpoint, synthetic_root, data_options, tmp_path
):
    """`tools/test.py CFG CKPT --cfg-options evaluator=SEA --out DIR`: the metric
    takes mmseg's output_dir/keep_results and writes its one results file there
    (with the per-image records), not in the work dir."""
    out_dir, work = tmp_path / 'out', tmp_path / 'work'
    run_tool(
        [
            'python',
            'tools/test.py',
            small_config,
            small_checkpoint,
            '--work-dir',
            str(work),
            '--out',
            str(out_dir),
            '--cfg-options',
            'evaluator=SEA',
            'evaluator.eps=8',
            'evaluator.steps=4',
            'test_dataloader.batch_size=4',
        ]
        + data_options(synthetic_root)
        + ['test_dataloader.dataset.indices=4']
    )
    written_files = glob.glob(str(out_dir / 'robustness_*.json'))
    assert len(written_files) == 1
    assert not glob.glob(str(work / 'robustness_*.json'))
    with open(written_files[0]) as f:
        written = json.load(f)
    assert written['summary']['num_images'] == 4
    assert written['metrics']['mIoU'] == round(written['summary']['clean']['mIoU'], 2)
    # keep_results (set by --out): one record per image, with its counts
    assert len(written['images']) == 4
    worst = written['summary']['eps']['8']['worst_case']
    assert worst['mIoU'] <= written['summary']['clean']['mIoU']
    # the budget: per image and SEA member its passes (at most its 4 steps),
    # and per member their mean and maximum in the summary
    budget = written['summary']['eps']['8']['budget']
    assert list(budget) == list(written['summary']['eps']['8']['attacks'])
    for name, entry in budget.items():
        passes = [r['attacks']['8'][name]['passes'] for r in written['images']]
        forwards = [r['attacks']['8'][name]['forwards'] for r in written['images']]
        assert all(1 <= p <= 4 for p in passes) and min(forwards) >= 1
        assert entry['passes'] == pytest.approx(sum(passes) / 4)
        assert entry['passes_max'] == max(passes)
        assert entry['forwards_max'] == max(forwards)


@pytest.mark.parametrize(
    'typed, expected',
    [
        ('best', ['best']),
        ('reference', ['reference']),
        (['best', 'reference'], ['best', 'reference']),
    ],
)
def test_worst_case_modes_as_typed_on_the_command_line(typed, expected):
    """`--cfg-options evaluator.worst_case_modes=best` gives one string."""
    from mmengine.config import Config, DictAction

    from mmseg_robust.engine import apply_robustness_evaluator

    cfg = Config(
        dict(
            model=dict(decode_head=dict(num_classes=21)),
            test_dataloader=dict(dataset=dict(type='PascalVOCDataset')),
        )
    )
    if isinstance(typed, str):  # what DictAction makes of the typed option
        typed = DictAction._parse_iterable(typed)
    apply_robustness_evaluator(cfg, dict(type='SEA', worst_case_modes=typed))
    assert cfg.test_evaluator.worst_case_modes == expected


def test_compat_reference_switch(repo_root):
    """`evaluator.compat=reference`: the reference's APGD in the attack and its
    greedy as the reported worst-case mIoU (first mode); the default keeps ours."""
    from mmengine.config import Config

    from mmseg_robust.engine import apply_robustness_evaluator

    path = osp.join(repo_root, 'configs/synthetic/upernet_convnext-micro_synthetic.py')
    cfg = apply_robustness_evaluator(
        Config.fromfile(path), dict(type='SEA', compat='reference', class_weights='voc')
    )
    assert cfg.test_cfg.attacks[0]['compat'] == 'reference'
    assert cfg.test_evaluator.worst_case_modes == ['reference', 'best']
    cfg = apply_robustness_evaluator(
        Config.fromfile(path), dict(type='SEA', class_weights='voc')
    )
    assert 'compat' not in cfg.test_cfg.attacks[0]
    assert cfg.test_evaluator.worst_case_modes == ['best', 'reference']
    with pytest.raises(ValueError, match="'default' or 'reference'"):
        apply_robustness_evaluator(
            Config.fromfile(path), dict(type='SEA', compat='x', class_weights='voc')
        )


def test_summary_names_the_mode_of_the_worst_case_miou():
    import torch

    from mmseg_robust.evaluation import (
        counts_of_batch,
        flatten_summary,
        image_record,
        summarize_records,
    )

    pred = torch.tensor([[[0, 1], [1, 1]]])
    label = torch.tensor([[[0, 1], [0, 1]]])
    c = counts_of_batch(pred, label, 2, 255)[0]
    records = [image_record('a', 2, c, {'8': {'X': c}})]
    for modes in (['best', 'reference'], ['reference', 'best']):
        s = summarize_records(records, modes)
        worst = s['eps']['8']['worst_case']
        assert worst['mIoU_mode'] == modes[0]
        assert worst['mIoU'] == worst[f'mIoU_{modes[0]}']
        flat = flatten_summary(s)
        assert set(k for k in flat if k.startswith('eps8/SEA/mIoU_')) == {
            'eps8/SEA/mIoU_best',
            'eps8/SEA/mIoU_reference',
        }


def _curve_tool(repo_root):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        '_robustness_curve_tool',
        osp.join(repo_root, 'tools', 'analysis_tools', 'robustness_curve.py'),
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('num', ['0', '-3'])
def test_curve_tool_refuses_no_images(repo_root, num, capsys):
    """--num-images 0 used to evaluate every image silently."""
    tool = _curve_tool(repo_root)
    with pytest.raises(SystemExit):
        tool.parse_args(['cfg.py', 'ckpt.pth', '--num-images', num])
    err = capsys.readouterr().err
    assert f'--num-images must be >= 1, got {num}' in err
    assert 'leave it out to evaluate every test image' in err
    assert tool.parse_args(['cfg.py', 'ckpt.pth', '--num-images', '1']).num_images == 1


def test_curve_tool_takes_evaluator_options_as_tools_test(repo_root, small_config):
    """``evaluator.*`` options reach the evaluator; those the tool sets from its
    own arguments are refused naming the argument; unknown ones are refused as
    tools/test.py refuses them."""
    tool = _curve_tool(repo_root)
    options, spec = tool.evaluator_options(
        {
            'evaluator.norm': 'L2',
            'evaluator.class_weights': 'voc',
            'test_dataloader.batch_size': 2,
        }
    )
    assert options == {'test_dataloader.batch_size': 2}
    assert spec == {'norm': 'L2', 'class_weights': 'voc'}
    for key, flag in [
        ('evaluator', '--attack'),
        ('evaluator.type', '--attack'),
        ('evaluator.eps', '--eps'),
        ('evaluator.steps', '--steps'),
        ('evaluator.n_iter', '--steps'),
        ('evaluator.seed', '--seed'),
    ]:
        with pytest.raises(SystemExit, match=flag):
            tool.evaluator_options({key: '4'})
    with pytest.raises(ValueError, match=r"unknown evaluator option\(s\) \['nrm'\]"):
        tool.main(
            [small_config, 'ckpt.pth', '--eps', '8']
            + ['--cfg-options', 'evaluator.nrm=L2']
        )


def test_curve_tool_honours_evaluator_norm(
    run_tool,
    repo_root,
    small_config,
    small_checkpoint,
    synthetic_root,
    data_options,
    tmp_path,
):
    """``evaluator.norm=L2`` gives an L2 curve (at 8/255 in L2 far weaker than
    L-inf), not the L-inf one."""
    runs = []
    for norm in ('Linf', 'L2'):
        runs += [
            ':::',
            'tools/analysis_tools/robustness_curve.py',
            small_config,
            small_checkpoint,
            '--attack',
            'PGD',
            '--eps',
            '8',
            '--n-iter',
            '2',
            '--num-images',
            '2',
            '--work-dir',
            str(tmp_path / norm),
            '--cfg-options',
            f'evaluator.norm={norm}',
            'evaluator.resume=False',
        ] + data_options(synthetic_root)
    run_tool(['python', 'tests/tools_in_one_process.py'] + runs[1:], cwd=repo_root)
    found = {}
    for norm in ('Linf', 'L2'):
        (path,) = glob.glob(str(tmp_path / norm / 'robustness_*.json'))
        result = json.load(open(path))
        assert result['attacks'][0]['norm'] == norm
        with open(tmp_path / norm / 'robustness_curve' / 'report.json') as f:
            (row,) = json.load(f)['models']
        found[norm] = row['eps']['8']['aAcc']
        assert found[norm] == pytest.approx(
            result['summary']['eps']['8']['worst_case']['aAcc_img'], abs=0.01
        )
    assert found['L2'] > found['Linf'] + 1, found
