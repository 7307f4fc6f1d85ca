"""The showcase: clean and robust models on the synthetic dataset, evaluated with SEA.

    python tools/demo.py [--work-dir work_dirs/demo] [--jobs 2]   (make demo)

Stages, each skipped when its result is already in the work dir (so a rerun after
an interruption finishes the rest; interrupted trainings and SEA runs resume):

1. the synthetic dataset (generated, no download);
2. clean training of the small UperNet-ConvNeXt;
3. PIR-AT, SAT and DDC-AT training, each starting from the clean model;
4. SEA of the four models at several eps on the first validation images, with
   the adversarial examples saved (``tools/test.py --show-dir``);
5. the report in ``WORK_DIR/report``: ``report.md``, ``report.json``,
   ``robustness_curve.png`` and a picture grid per model (``examples_<model>.png``).

Trainings and evaluations run as the stock ``tools/train.py`` / ``tools/test.py``
in subprocesses, ``--jobs`` at a time (one thread each); their logs are in the work
dir and a progress line (stage, iterations or images, ETA) is printed every few
seconds. The defaults fit in about 15 minutes on 2 CPU cores; the SEA settings are
reduced from the paper's (``--sea-iters 300``, all 100 images) and the report says
which were used.
"""

import argparse
import glob
import os
import os.path as osp
import re
import subprocess
import sys
import time
from datetime import datetime

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIG_DIR = osp.join(REPO, 'configs', 'synthetic')
CLEAN_CONFIG = 'upernet_convnext-micro_synthetic.py'
#: model name -> (config, scheme label) in the order of the report
MODELS = {
    'clean': (CLEAN_CONFIG, 'standard training'),
    'PIR-AT': ('upernet_convnext-micro_pirat_synthetic.py', 'PIR-AT'),
    'SAT': ('upernet_convnext-micro_sat_synthetic.py', 'SAT'),
    'DDC-AT': ('upernet_convnext-micro_ddcat_synthetic.py', 'DDC-AT'),
}
LOADER_OPTS = [
    f'{loader}.{key}'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
    for key in ('num_workers=0', 'persistent_workers=False')
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument('--work-dir', default=osp.join('work_dirs', 'demo'))
    p.add_argument('--data-root', default=osp.join('data', 'synthetic_shapes'))
    p.add_argument(
        '--jobs', type=int, default=2, help='trainings/evaluations run in parallel'
    )
    p.add_argument('--clean-iters', type=int, default=2000)
    p.add_argument(
        '--at-iters',
        type=int,
        default=1000,
        help='adversarial training iterations per robust model',
    )
    p.add_argument(
        '--eps',
        type=float,
        nargs='+',
        default=[2, 4, 8],
        help='SEA radii (/255); 0 (clean) is always reported',
    )
    p.add_argument(
        '--sea-iters',
        type=int,
        default=100,
        help='iterations of each SEA attack (the paper: 300)',
    )
    p.add_argument(
        '--sea-images',
        type=int,
        default=48,
        help='validation images evaluated (all: 100)',
    )
    p.add_argument(
        '--grid-images', type=int, default=4, help='rows of each picture grid'
    )
    p.add_argument(
        '--poll', type=float, default=10.0, help='seconds between progress lines'
    )
    return p.parse_args(argv)


class Demo:
    def __init__(self, args):
        self.args = args
        self.work = osp.abspath(args.work_dir)
        self.data_root = osp.abspath(args.data_root)
        self.t0 = time.time()

    # ------------------------------------------------------------- helpers
    def say(self, msg: str) -> None:
        secs = int(time.time() - self.t0)
        print(f'[demo {secs // 60:02d}:{secs % 60:02d}] {msg}', flush=True)

    def data_opts(self):
        return [
            f'{loader}.dataset.data_root={self.data_root}'
            for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
        ] + LOADER_OPTS

    def train_dir(self, model):
        return osp.join(self.work, 'train', model)

    def iters(self, model):
        return self.args.clean_iters if model == 'clean' else self.args.at_iters

    def checkpoint(self, model):
        return osp.join(self.train_dir(model), f'iter_{self.iters(model)}.pth')

    def sea_dir(self, model):
        return osp.join(self.work, 'sea', model)

    def run_jobs(self, jobs, what):
        """Run ``[(name, cmd, log)]``, ``--jobs`` at a time, with progress lines."""
        # the cores are shared by the jobs that run at once (a lone job gets all)
        parallel = max(1, min(self.args.jobs, len(jobs)))
        threads = str(max(1, (os.cpu_count() or 1) // parallel))
        env = dict(
            os.environ,
            OMP_NUM_THREADS=threads,
            MKL_NUM_THREADS=threads,
            PYTHONUNBUFFERED='1',
        )
        env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
        pending, running, failed = list(jobs), {}, []
        last = 0.0
        while pending or running:
            while pending and len(running) < max(1, self.args.jobs):
                name, cmd, log = pending.pop(0)
                os.makedirs(osp.dirname(log), exist_ok=True)
                f = open(log, 'a')
                # progress() reads only what follows the last marker
                f.write(f'{_MARKER} {datetime.now().isoformat()}\n')
                f.flush()
                running[name] = (
                    subprocess.Popen(
                        cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT
                    ),
                    log,
                    f,
                )
            time.sleep(1.0)
            for name, (proc, log, f) in list(running.items()):
                if proc.poll() is not None:
                    f.close()
                    del running[name]
                    if proc.returncode != 0:
                        failed.append((name, log))
                        self.say(
                            f'{what}: {name} FAILED (exit '
                            f'{proc.returncode}), log: {log}'
                        )
                    else:
                        self.say(f'{what}: {name} done')
            if running and time.time() - last >= self.args.poll:
                last = time.time()
                self.say(
                    f'{what}: '
                    + ' | '.join(
                        f'{name} {progress(log)}'
                        for name, (_, log, _) in running.items()
                    )
                    + (
                        f' | waiting: {", ".join(j[0] for j in pending)}'
                        if pending
                        else ''
                    )
                )
        if failed:
            tails = '\n'.join(f'--- {n}: {log}\n' + tail(log) for n, log in failed)
            raise SystemExit(
                f'{what} failed for {[n for n, _ in failed]}; '
                f'rerun the same command to retry the rest.\n'
                f'{tails}'
            )

    # -------------------------------------------------------------- stages
    def stage_data(self):
        from mmseg_robust.datasets import generate_synthetic_dataset

        if osp.isdir(self.data_root):
            self.say(f'1/5 data: found {self.data_root}')
            return
        self.say(f'1/5 data: generating the synthetic dataset in {self.data_root}')
        generate_synthetic_dataset(self.data_root)

    def train_cmd(self, model, load_from=None):
        config, _ = MODELS[model]
        iters = self.iters(model)
        opts = [
            f'train_cfg.max_iters={iters}',
            f'train_cfg.val_interval={iters}',
            f'param_scheduler.1.end={iters}',
            # intermediate checkpoints, so that an interrupted run resumes
            f'default_hooks.checkpoint.interval={max(iters // 4, 1)}',
            'default_hooks.logger.interval=50',
        ]
        # Resume from the work dir's last checkpoint if an interrupted run left
        # one; otherwise start (robust models: from the clean model's weights).
        # (mmengine's --resume with load_from set would resume *from* load_from.)
        resume = osp.isfile(osp.join(self.train_dir(model), 'last_checkpoint'))
        if resume:
            opts.append('load_from=None')
        elif model != 'clean':
            opts.append(f'load_from={load_from}')
        cmd = [
            sys.executable,
            'tools/train.py',
            osp.join(CONFIG_DIR, config),
            '--work-dir',
            self.train_dir(model),
        ]
        if resume:
            cmd.append('--resume')
        return cmd + ['--cfg-options'] + opts + self.data_opts()

    def stage_train(self, models, number, title):
        todo = [m for m in models if not osp.isfile(self.checkpoint(m))]
        for m in models:
            if m not in todo:
                self.say(f'{number} {title}: {m} already trained: {self.checkpoint(m)}')
        if not todo:
            return
        jobs = [
            (
                m,
                self.train_cmd(m, self.checkpoint('clean')),
                osp.join(self.train_dir(m), 'train.log'),
            )
            for m in todo
        ]
        self.say(
            f'{number} {title}: training {", ".join(todo)} '
            f'({len(todo)} job(s), {self.args.jobs} at a time)'
        )
        self.run_jobs(jobs, f'{number} {title}')

    def sea_settings(self):
        return dict(
            eps=sorted(float(e) for e in self.args.eps if e > 0),
            steps=self.args.sea_iters,
            images=self.args.sea_images,
        )

    def sea_result(self, model):
        """The newest robustness JSON of ``model`` with the demo's settings."""
        want = self.sea_settings()
        for path in sorted(
            glob.glob(osp.join(self.sea_dir(model), 'robustness_*.json')), reverse=True
        ):
            from mmseg_robust.evaluation import load_results

            try:
                res = load_results(path)
            except ValueError:  # not a results file (or cut short): skip it
                continue
            attack = res.attacks[0] if res.attacks else {}
            got = dict(
                eps=sorted(res.eps),
                steps=attack.get('steps', attack.get('n_iter')),
                images=res.summary.get('num_images'),
            )
            if got == want:
                return path
        return None

    def sea_cmd(self, model):
        s = self.sea_settings()
        eps = ','.join(f'{e:g}' for e in s['eps'])
        return [
            sys.executable,
            'tools/test.py',
            osp.join(CONFIG_DIR, MODELS[model][0]),
            self.checkpoint(model),
            '--work-dir',
            self.sea_dir(model),
            '--show-dir',
            osp.join(self.sea_dir(model), 'show'),
            '--cfg-options',
            'evaluator=SEA',
            f'evaluator.eps=[{eps}]',
            f'evaluator.steps={s["steps"]}',
            f'test_dataloader.dataset.indices={s["images"]}',
            'test_dataloader.batch_size=8',
        ] + self.data_opts()

    def stage_sea(self):
        done = {m: self.sea_result(m) for m in MODELS}
        todo = [m for m, path in done.items() if path is None]
        for m, path in done.items():
            if path is not None:
                self.say(f'4/5 SEA: {m} already evaluated: {path}')
        if not todo:
            return
        s = self.sea_settings()
        self.say(
            f'4/5 SEA: evaluating {", ".join(todo)} at eps '
            f'{s["eps"]}/255, {s["steps"]} iterations per attack, '
            f'{s["images"]} images'
        )
        # the clean model breaks fastest (early stop): schedule it last
        todo.sort(key=lambda m: m == 'clean')
        jobs = [
            (m, self.sea_cmd(m), osp.join(self.sea_dir(m), 'test.log')) for m in todo
        ]
        self.run_jobs(jobs, '4/5 SEA')

    def stage_report(self):
        import torch

        from mmseg_robust.datasets.synthetic import CLASSES, PALETTE
        from mmseg_robust.reporting import (
            load_example,
            load_result,
            save_picture_grid,
            write_report,
        )

        out = osp.join(self.work, 'report')
        self.say(f'5/5 report: writing {out}')
        rows = [load_result(self.sea_result(m), name=m) for m in MODELS]
        s = self.sea_settings()
        settings = {
            'attack': 'SEA (APGD with Mask-CE-Bal, Mask-CE, JS-Avg; worst case)',
            'iterations per attack': s['steps'],
            'images': s['images'],
            'dataset': 'synthetic shapes (val)',
            'training': (
                f'clean {self.args.clean_iters} it; PIR-AT/SAT/DDC-AT '
                f'{self.args.at_iters} it from the clean model'
            ),
            'machine': machine(torch),
            'date': datetime.now().strftime('%Y-%m-%d'),
        }
        paths = write_report(
            rows,
            out,
            title='mmseg_robust demo: robustness on the synthetic dataset',
            settings=settings,
        )
        eps = max(s['eps'])
        for m in MODELS:
            files = sorted(
                glob.glob(osp.join(self.sea_dir(m), 'show', '*_example.npz'))
            )[: self.args.grid_images]
            if not files:
                self.say(
                    f'5/5 report: no saved examples for {m} (evaluated '
                    f'from the cache only); skipping its picture grid'
                )
                continue
            path = osp.join(out, f'examples_{m}.png')
            save_picture_grid(
                [load_example(f) for f in files],
                path,
                PALETTE,
                title=f'{m}: SEA worst case at ε={eps:g}/255',
                class_names=CLASSES,
            )
            paths[f'examples_{m}'] = path
        for k, v in paths.items():
            self.say(f'5/5 report: {k}: {v}')
        return paths

    def run(self):
        a = self.args
        self.say(f'work dir {self.work}; {a.jobs} parallel job(s)')
        self.stage_data()
        self.stage_train(['clean'], '2/5', 'clean training')
        # slowest first, so that the cores stay busy to the end
        self.stage_train(['DDC-AT', 'SAT', 'PIR-AT'], '3/5', 'adversarial training')
        self.stage_sea()
        paths = self.stage_report()
        self.say(f'done in {time.time() - self.t0:.0f} s')
        return paths


_MARKER = '=== tools/demo.py started this job at'
_ITER = re.compile(
    r'Iter\((?:train|val|test)\)\s*\[\s*(\d+)/(\d+)\].*?'
    r'eta: (\S+)'
)
_ROBUST = re.compile(r'Robustness \[(\d+)/(\d+) batches\] (.*)')


def progress(log: str) -> str:
    """A short progress string from a tools/train.py or tools/test.py log."""
    try:
        with open(log, errors='replace') as f:
            lines = f.readlines()
    except OSError:
        return 'starting'
    starts = [i for i, line in enumerate(lines) if line.startswith(_MARKER)]
    lines = lines[starts[-1] + 1 if starts else 0 :][-200:]
    robust = [m.groups() for m in map(_ROBUST.search, lines) if m]
    if robust:
        done, total, rest = robust[-1]
        attack = re.search(r'(?:running|last attack) (eps [^,]+)', rest)
        # the ETA is on the per-batch lines, the attack running on every line
        etas = [re.search(r'ETA (\S+)', r[2]) for r in robust]
        eta = next((e.group(1) for e in reversed(etas) if e), None)
        return (
            f'batch {done}/{total}'
            + (f' {attack.group(1)}' if attack else '')
            + (f' ETA {eta}' if eta else '')
        )
    for line in reversed(lines):
        m = _ITER.search(line)
        if m and 'Iter(train)' in line:
            return f'iter {m.group(1)}/{m.group(2)} ETA {m.group(3)}'
    return 'starting'


def tail(path: str, n: int = 30) -> str:
    try:
        with open(path, errors='replace') as f:
            return ''.join(f.readlines()[-n:])
    except OSError:
        return ''


def machine(torch) -> str:
    import platform

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f'{platform.machine()} CPU, {os.cpu_count()} cores'


def main(argv=None):
    os.chdir(REPO)
    return Demo(parse_args(argv)).run()


if __name__ == '__main__':
    main()
