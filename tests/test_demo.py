"""tools/demo.py's bookkeeping: progress lines from the tools' logs, stage
skipping and resuming (the stages themselves are the tools, tested elsewhere)."""

import importlib.util
import json
import os.path as osp

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def demo():
    spec = importlib.util.spec_from_file_location(
        'mmseg_robust_demo', osp.join(REPO, 'tools', 'demo.py')
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_progress_from_logs(demo, tmp_path):
    log = tmp_path / 'train.log'
    assert demo.progress(str(log)) == 'starting'
    log.write_text(
        '11/21 16:50:01 - mmengine - INFO - Iter(train) [ 300/1000]  '
        'base_lr: 1.0e-03 lr: 1.0e-03  eta: 0:01:10  time: 0.10  loss: 0.5\n'
        '11/21 16:50:02 - mmengine - INFO - Iter(train) [ 350/1000]  '
        'base_lr: 1.0e-03 lr: 1.0e-03  eta: 0:01:05  time: 0.10  loss: 0.5\n'
    )
    assert demo.progress(str(log)) == 'iter 350/1000 ETA 0:01:05'
    log = tmp_path / 'test.log'
    log.write_text(
        'Robustness [2/6 batches] running eps 4: APGD-Mask-CE\n'
        'Robustness [2/6 batches] images done on this rank: 16 (16 attacked, '
        '0 from cache), last attack eps 8: APGD-JS-Avg, ETA 0:02:30\n'
    )
    assert demo.progress(str(log)) == 'batch 2/6 eps 8: APGD-JS-Avg ETA 0:02:30'
    # the next batch has started: its attack, the last ETA known
    with open(log, 'a') as f:
        f.write('Robustness [3/6 batches] running eps 2: APGD-Mask-CE\n')
    assert demo.progress(str(log)) == 'batch 3/6 eps 2: APGD-Mask-CE ETA 0:02:30'
    # a rerun appends to the log: only its own lines count
    with open(log, 'a') as f:
        f.write(f'{demo._MARKER} 2026-11-21T17:00:00\n')
    assert demo.progress(str(log)) == 'starting'


def _args(demo, tmp_path, *extra):
    return demo.parse_args(
        ['--work-dir', str(tmp_path / 'work'), '--data-root', str(tmp_path / 'data')]
        + list(extra)
    )


def test_sea_stage_skipped_only_with_the_same_settings(demo, tmp_path):
    d = demo.Demo(
        _args(
            demo, tmp_path, '--eps', '8', '2', '--sea-iters', '7', '--sea-images', '5'
        )
    )
    assert d.sea_result('SAT') is None
    folder = tmp_path / 'work' / 'sea' / 'SAT'
    folder.mkdir(parents=True)

    def write(name, eps, n_iter, images, key='steps'):
        clean = dict(mIoU=50.0, aAcc=90.0, aAcc_img=90.0)
        (folder / name).write_text(
            json.dumps(
                dict(
                    schema_version=2,
                    unit='percent',
                    eps=eps,
                    attacks=[{'type': 'SEA', key: n_iter}],
                    summary=dict(num_images=images, clean=clean, eps={}),
                )
            )
        )

    write('robustness_20261121_100000.json', [2.0, 8.0], 300, 5)
    write('robustness_20261121_110000.json', [2.0, 8.0], 7, 100)
    assert d.sea_result('SAT') is None  # other iterations / images
    (folder / 'robustness_20261121_120000.json').write_text('{"not": "a result"}')
    assert d.sea_result('SAT') is None  # not a results file: skipped
    # a file of the previous schema (n_iter, fractions) still counts
    write('robustness_20261121_090000.json', [2.0, 8.0], 7, 5, key='n_iter')
    assert d.sea_result('SAT').endswith('robustness_20261121_090000.json')
    cmd = d.sea_cmd('SAT')
    assert 'evaluator.eps=[2,8]' in cmd and 'evaluator.steps=7' in cmd
    assert 'test_dataloader.dataset.indices=5' in cmd


def test_training_starts_from_clean_or_resumes(demo, tmp_path):
    d = demo.Demo(_args(demo, tmp_path, '--at-iters', '40'))
    clean = d.checkpoint('clean')
    cmd = d.train_cmd('SAT', clean)
    # a fresh robust model starts from the clean weights, not resumed
    assert '--resume' not in cmd and f'load_from={clean}' in cmd
    assert 'train_cfg.max_iters=40' in cmd
    assert d.checkpoint('SAT').endswith(osp.join('SAT', 'iter_40.pth'))
    # an interrupted one resumes from its own last checkpoint (mmengine's
    # --resume with load_from set would resume from the clean model instead)
    work = tmp_path / 'work' / 'train' / 'SAT'
    work.mkdir(parents=True)
    (work / 'last_checkpoint').write_text(str(work / 'iter_10.pth'))
    cmd = d.train_cmd('SAT', clean)
    assert '--resume' in cmd and 'load_from=None' in cmd
    assert f'load_from={clean}' not in cmd
