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
    # a corruption run: its image passes computed against those to compute
    log = tmp_path / 'corruptions.log'
    log.write_text(
        '12/06 10:40:33 - mmengine - INFO - Corruptions [pass 1/76: clean, batch '
        '3/3] image passes computed on this rank: 24/1824, ETA 0:00:08\n'
        '12/06 10:40:35 - mmengine - INFO - Corruptions [pass 20/76: '
        'defocus_blur/4, batch 3/3] image passes computed on this rank: '
        '480/1824, ETA 0:00:06\n'
    )
    assert demo.progress(str(log), True) == (
        'pass 20/76 (defocus_blur/4) ETA 0:00:06',
        pytest.approx(480 / 1824),
    )


def test_sea_progress_counts_the_lines_of_a_finished_batch(demo, tmp_path):
    """The fraction done within a SEA batch: its progress lines against those of
    a finished batch (before one has finished: the expected count given)."""
    log = tmp_path / 'test.log'

    def lines(batch, n, done=False):
        out = [
            f'Robustness [{batch}/4 batches] running eps 8: attack {i}\n'
            for i in range(n)
        ]
        if done:
            out.append(
                f'Robustness [{batch}/4 batches] images done on this rank: 8 '
                '(8 attacked, 0 from cache), last attack eps 8: x, ETA 0:01:00\n'
            )
        return ''.join(out)

    log.write_text(lines(1, 3))
    assert demo.progress(str(log), True, lines_per_batch=12)[1] == pytest.approx(
        3 / 12 / 4
    )
    # without the expected count: at most one more line than seen
    assert demo.progress(str(log), True)[1] == pytest.approx(3 / 4 / 4)
    log.write_text(lines(1, 8, done=True) + lines(2, 2))
    # the finished batch had 8 lines: 2 of 8 done in batch 2
    assert demo.progress(str(log), True, lines_per_batch=12)[1] == pytest.approx(
        (1 + 2 / 8) / 4
    )
    log.write_text(lines(1, 8, done=True) + lines(2, 8, done=True))
    assert demo.progress(str(log), True)[1] == pytest.approx(2 / 4)


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


def test_corruption_stage_skipped_only_with_the_same_settings(
    demo, tmp_path, corruption_results
):
    """A corruption run after each model's training, on the SEA images; its
    result found again only with the same corruptions, severities and images."""
    # other iteration counts than the defaults: the trainings' checkpoints are
    # looked for in the test's work dir, not in the checkout's work_dirs/ (where
    # a `make demo` puts them)
    d = demo.Demo(
        _args(
            demo,
            tmp_path,
            '--clean-iters',
            '999',
            '--at-iters',
            '299',
            '--sea-images',
            '5',
            '--corruptions',
            'noise,fog',
            '--severities',
            '3',
            '1',
        )
    )
    names = ['gaussian_noise', 'shot_noise', 'impulse_noise', 'fog']
    assert d.corruption_settings() == dict(names=names, severities=[1, 3], images=5)
    folder = tmp_path / 'work' / 'corruptions' / 'SAT'
    assert d.corruption_result('SAT') is None
    write = corruption_results.write_corruption_results
    write(folder, names, [1, 3], images=100, timestamp='20261206_100000')
    write(folder, names[:3], [1, 3], images=5, timestamp='20261206_100001')
    write(folder, names, [1, 2, 3], images=5, timestamp='20261206_100002')
    (folder / 'robustness_20261206_100003.json').write_text('{"not": "a result"}')
    assert d.corruption_result('SAT') is None  # other images / names / severities
    path, _ = write(folder, names, [1, 3], images=5, timestamp='20261206_090000')
    assert d.corruption_result('SAT') == path
    cmd = d.corruption_cmd('SAT')
    assert cmd[:3] == [
        'tools/test.py',
        osp.join(demo.CONFIG_DIR, demo.MODELS['SAT'][0]),
        d.checkpoint('SAT'),
    ]
    for option in (
        'evaluator=Corruptions',
        'evaluator.corruptions=noise,fog',
        'evaluator.severities=[1,3]',
        'test_dataloader.dataset.indices=5',
    ):
        assert option in cmd, option
    # nothing trained yet: a corruption job per model but SAT's, each after
    # its model's training, its cost the image passes
    jobs = d.jobs()
    corr = {n: j for n, j in jobs.items() if n.startswith('corruptions')}
    assert set(corr) == {f'corruptions {m}' for m in demo.MODELS if m != 'SAT'}
    for name, job in corr.items():
        assert job.deps == [f'train {name.split()[1]}'] and job.threads == 'dynamic'
        assert job.cost == pytest.approx(demo.CORRUPTION_COST * 5 * (1 + 4 * 2))
    d = demo.Demo(_args(demo, tmp_path, '--corruptions', 'none'))
    assert d.corruption_settings() is None
    assert not any(n.startswith('corruptions') for n in d.jobs())


def test_bad_corruption_options_are_refused(demo, tmp_path, capsys):
    for extra in (['--corruptions', 'fgo'], ['--severities', '6']):
        with pytest.raises(SystemExit):
            _args(demo, tmp_path, *extra)
        assert '--corruptions/--severities' in capsys.readouterr().err


def test_training_starts_from_clean_or_resumes(demo, tmp_path):
    d = demo.Demo(_args(demo, tmp_path, '--at-iters', '40'))
    clean = d.checkpoint('clean')
    cmd = d.train_cmd('SAT', clean)
    # a fresh robust model starts from the clean weights, not resumed
    assert '--resume' not in cmd and f'load_from={clean}' in cmd
    assert 'train_cfg.max_iters=40' in cmd
    # other iterations than the config's: in the demo's work dir
    assert d.checkpoint('SAT') == str(
        tmp_path / 'work' / 'train' / 'SAT-40it' / 'iter_40.pth'
    )
    # an interrupted one resumes from its own last checkpoint (mmengine's
    # --resume with load_from set would resume from the clean model instead)
    work = tmp_path / 'work' / 'train' / 'SAT-40it'
    work.mkdir(parents=True)
    (work / 'last_checkpoint').write_text(str(work / 'iter_10.pth'))
    cmd = d.train_cmd('SAT', clean)
    assert '--resume' in cmd and 'load_from=None' in cmd
    assert f'load_from={clean}' not in cmd


def test_robust_configs_start_from_the_demos_clean_model(demo, tmp_path):
    """With the configs' iterations the demo trains where tools/train.py does,
    so the synthetic robust configs' load_from is the demo's clean model."""
    from mmengine.config import Config

    d = demo.Demo(_args(demo, tmp_path, '--train-root', 'work_dirs'))
    clean = d.checkpoint('clean')
    assert clean == osp.join(
        REPO,
        'work_dirs',
        'upernet_convnext-micro_synthetic',
        f'iter_{demo.config_iters(demo.CLEAN_CONFIG)}.pth',
    )
    for model, (config, _) in demo.MODELS.items():
        if model == 'clean':
            continue
        cfg = Config.fromfile(osp.join(demo.CONFIG_DIR, config))
        assert osp.join(REPO, cfg.load_from) == clean, config
        # the configs' own schedule: no iteration overrides on the command line
        assert not any('max_iters' in o for o in d.train_cmd(model, clean))
        assert d.train_dir(model) == osp.join(
            REPO, 'work_dirs', osp.splitext(config)[0]
        )


def test_missing_clean_model_names_the_command(tmp_path):
    """The README's robust training command without the clean model: an error
    that says which command writes it (load_from of the same form as the
    config's, a checkpoint that does not exist)."""
    import subprocess
    import sys

    missing = 'work_dirs/upernet_convnext-micro_synthetic/iter_999999.pth'
    proc = subprocess.run(
        [
            sys.executable,
            'tools/train.py',
            'configs/synthetic/upernet_convnext-micro_pirat_synthetic.py',
            '--work-dir',
            str(tmp_path / 'w'),
            '--cfg-options',
            f'load_from={missing}',
        ]
        # a tiny dataset of its own (the train loop builds it first)
        + [
            f'{loader}.dataset.{key}'
            for loader in ('train_dataloader', 'val_dataloader')
            for key in (
                f'data_root={tmp_path / "data"}',
                'generator_cfg.splits.train=2',
                'generator_cfg.splits.val=1',
            )
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert f'load_from={missing} does not exist' in proc.stdout, proc.stdout[-3000:]
    assert (
        'python tools/train.py configs/synthetic/upernet_convnext-micro_synthetic.py'
        in proc.stdout
    )


def test_threads_follow_the_jobs(demo):
    def job(name, threads):
        return demo.Job(name, [], '/nonexistent', 1.0, threads=threads)

    clean = job('train clean', 'all')
    sat, pirat = job('train SAT', 'share'), job('train PIR-AT', 'share')
    sea1, sea2 = job('SEA clean', 'dynamic'), job('SEA SAT', 'dynamic')
    assert demo.allocate([clean], 2, 2) == {'train clean': 2}
    assert demo.allocate([sat, pirat], 2, 2) == {'train SAT': 1, 'train PIR-AT': 1}
    # a robust training keeps its share (reproducible weights) ...
    assert demo.allocate([sat], 2, 2) == {'train SAT': 1}
    # ... a SEA run takes what is free
    assert demo.allocate([sat, sea1], 2, 2) == {'train SAT': 1, 'SEA clean': 1}
    assert demo.allocate([sea1], 2, 2) == {'SEA clean': 2}
    assert demo.allocate([sea1, sea2], 4, 2) == {'SEA clean': 2, 'SEA SAT': 2}


def test_schedule_keeps_the_cores_busy(demo):
    """Longest chain first: the robust trainings before the clean model's SEA,
    and the simulated schedule has no idle core until the last job."""
    costs = {'train clean': 100, 'train DDC-AT': 300, 'train SAT': 200}
    costs.update({'SEA clean': 150, 'SEA DDC-AT': 250, 'SEA SAT': 250})
    jobs = {}
    for name, cost in costs.items():
        model = name.split()[1]
        deps = (
            []
            if name == 'train clean'
            else (['train clean'] if name.startswith('train') else [f'train {model}'])
        )
        threads = (
            'all'
            if name == 'train clean'
            else ('share' if name.startswith('train') else 'dynamic')
        )
        jobs[name] = demo.Job(name, [], '/nonexistent', cost, deps, threads)
    assert demo.pick(jobs, [], 2) == ['train clean']
    jobs['train clean'].done = True
    assert demo.pick(jobs, [], 2) == ['train DDC-AT', 'train SAT']
    total = demo.simulate(jobs, [], 2, 2)
    work = sum(c for n, c in costs.items() if n != 'train clean')
    work += demo.STARTUP * (len(costs) - 1)
    # two cores busy all along but for the tail (a lone SEA run uses both)
    assert work / 2 <= total <= work / 2 * 1.15


def test_child_applies_the_thread_count_on_a_signal(tmp_path):
    """tools/demo.py --run-tool: the tool runs in the child with the threads
    of the threads file, changed on SIGUSR1 while it runs."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / 'tool.py'
    out = tmp_path / 'out.txt'
    script.write_text(
        'import time, torch\n'
        'seen = []\n'
        'for _ in range(200):\n'
        '    seen.append(torch.get_num_threads())\n'
        '    if len(set(seen)) > 1: break\n'
        '    time.sleep(0.05)\n'
        f'open({str(out)!r}, "w").write(" ".join(map(str, sorted(set(seen)))))\n'
    )
    threads = tmp_path / 'threads'
    threads.write_text('1')
    proc = subprocess.Popen(
        [
            sys.executable,
            osp.join(REPO, 'tools', 'demo.py'),
            '--run-tool',
            str(threads),
            str(script),
        ],
        cwd=REPO,
    )
    for _ in range(600):
        if (tmp_path / 'threads.ready').exists():
            break
        time.sleep(0.05)
    threads.write_text('2')
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(60) == 0
    assert out.read_text() == '1 2'


def test_eta_counts_the_start_up_until_a_job_prints_progress(demo):
    """A running job still starting (no progress line yet) has its start-up
    ahead of it in the simulated remaining time; once it is past it, not."""
    job = demo.Job('SEA SAT', [], '/nonexistent', 100.0, threads='dynamic')
    jobs = {'SEA SAT': job}
    starting = demo.simulate(jobs, ['SEA SAT'], 1, 1)
    assert starting == pytest.approx(100.0 + demo.STARTUP)
    job.warm, job.frac = True, 0.25
    assert demo.simulate(jobs, ['SEA SAT'], 1, 1) == pytest.approx(75.0)
    # a job not started yet: its start-up is ahead too
    later = demo.Job('x', [], '/nonexistent', 10.0)
    assert demo.simulate({'x': later}, [], 1, 1) == pytest.approx(10.0 + demo.STARTUP)


def test_report_stage_names_the_sea_budget(
    demo, tmp_path, monkeypatch, corruption_results
):
    """The report, the plot's caption and each picture grid's title say which
    SEA budget produced them (iterations per attack, images, eps); the
    corruption results of each model are in the report beside its SEA ones."""
    import numpy as np

    import mmseg_robust.reporting as reporting

    d = demo.Demo(
        _args(
            demo,
            tmp_path,
            '--eps',
            '8',
            '2',
            '--sea-iters',
            '7',
            '--sea-images',
            '5',
            '--corruptions',
            'blur',
            '--severities',
            '1',
            '5',
        )
    )
    corruption_files = []
    for i, model in enumerate(demo.MODELS):
        corruption_files.append(
            corruption_results.write_corruption_results(
                tmp_path / 'work' / 'corruptions' / model,
                d.corruption_settings()['names'],
                [1, 5],
                quality=0.9 - 0.05 * i,
                images=5,
            )[0]
        )
    for i, model in enumerate(demo.MODELS):
        folder = tmp_path / 'work' / 'sea' / model
        (folder / 'show').mkdir(parents=True)
        worst = dict(mIoU=40.0 - i, aAcc_img=80.0 - i)
        (folder / 'robustness_20261121_100000.json').write_text(
            json.dumps(
                dict(
                    schema_version=3,
                    unit='percent',
                    eps=[2.0, 8.0],
                    attacks=[{'type': 'SEA', 'steps': 7}],
                    flags=[],
                    summary=dict(
                        num_images=5,
                        clean=dict(mIoU=70.0, aAcc=95.0, aAcc_img=94.0),
                        eps={'2': dict(worst_case=worst), '8': dict(worst_case=worst)},
                    ),
                )
            )
        )
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 5, (8, 8))
    reporting.save_example(
        dict(
            name='img_0',
            image=image,
            adv_image=image,
            gt=labels,
            clean_pred=labels,
            adv_pred=labels,
            eps=8.0,
            attack='SEA',
            clean_acc=1.0,
            adv_acc=1.0,
        ),
        str(tmp_path / 'work' / 'sea' / 'PIR-AT' / 'show' / 'img_0_example'),
    )
    titles = {}
    save_grid = reporting.save_picture_grid

    def spy(examples, out_file, palette, title=None, class_names=None):
        titles[osp.basename(out_file)] = title
        return save_grid(examples, out_file, palette, title, class_names)

    monkeypatch.setattr(reporting, 'save_picture_grid', spy)
    paths = d.stage_report()
    budget = 'SEA, 7 iterations per attack, 5 images, ε = 2, 8/255'
    with open(paths['markdown'], encoding='utf-8') as f:
        assert f'Robust numbers from: {budget}.' in f.read()
    with open(paths['json'], encoding='utf-8') as f:
        assert json.load(f)['budget'] == budget
    assert titles == {
        'examples_PIR-AT.png': 'PIR-AT: SEA worst case at ε=8/255 (7 iterations per '
        'attack, 1 of the 5 evaluated images)'
    }
    # the corruption table: a line per model, from its own corruption file
    rows = [
        reporting.load_result(p, name=m) for p, m in zip(corruption_files, demo.MODELS)
    ]
    with open(paths['markdown'], encoding='utf-8') as f:
        md = f.read()
    assert reporting.format_corruption_table(rows) in md
    assert 'Corruption numbers from: 4 corruptions (defocus_blur, glass_blur, ' in md
    with open(paths['json'], encoding='utf-8') as f:
        models = json.load(f)['models']
    assert [m['name'] for m in models] == list(demo.MODELS)
    assert [m['corruptions'] for m in models] == [r['corruptions'] for r in rows]
    assert all(m['eps'] for m in models)
    for key in ('corruption_heatmap', 'corruption_severity'):
        assert osp.isfile(paths[key])
