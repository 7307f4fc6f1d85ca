"""The showcase: clean and robust models on the synthetic dataset, evaluated with SEA
and under common corruptions.

    python tools/demo.py [--work-dir work_dirs/demo] [--jobs 2]   (make demo)

Steps (each skipped when its result is already there, so a rerun after an
interruption finishes the rest; interrupted trainings, SEA and corruption runs
resume):

1. the synthetic dataset (generated, no download);
2. clean training of the small UperNet-ConvNeXt;
3. PIR-AT, SAT and DDC-AT training, each starting from the clean model;
4. SEA of the four models at several eps on the first validation images, with
   the adversarial examples saved (``tools/test.py --show-dir``);
5. the common corruptions of the four models on the same images
   (``tools/test.py ... evaluator=Corruptions``): by default the 15 benchmark
   corruptions at severities 1-5 (``--corruptions``, ``--severities``);
6. the report in ``WORK_DIR/report``: ``report.md``, ``report.json``,
   ``robustness_curve.png``, a picture grid per model (``examples_<model>.png``),
   and of the corruptions ``corruption_heatmap.png`` (mIoU per corruption and
   severity) and ``corruption_severity.png`` (mIoU per category against severity).

The trainings write where ``tools/train.py CONFIG`` does (``work_dirs/<config
name>/``), so the README's commands for the synthetic configs (which start from
``work_dirs/upernet_convnext-micro_synthetic/iter_<N>.pth``) continue from the
demo's models; with other ``--clean-iters``/``--at-iters`` they go to
``WORK_DIR/train/<model>-<N>it`` instead. SEA runs (``WORK_DIR/sea/<model>``),
corruption runs (``WORK_DIR/corruptions/<model>``) and the report are in WORK_DIR.

Trainings and evaluations run as the stock ``tools/train.py`` / ``tools/test.py``
in subprocesses, as a dependency graph (each robust training after the clean
one, each SEA run and each corruption run after its model's training),
``--jobs`` at a time, longest chain first, so that every core has work to the
end. Threads: the clean training runs alone and uses every core; the robust
trainings run next to another job and use their share of the cores (a fixed
number, so that their weights do not depend on timing: CPU training is not
bit-identical across thread counts); the SEA and corruption runs (whose results
do not depend on the thread count) share what is left and are given more
threads as other jobs finish (``torch.set_num_threads`` on a signal). A progress
line (each job's iteration, batch or pass, and the demo's ETA from a cost model
calibrated on the progress so far) is printed every few seconds. With the
defaults on 2 CPU cores the trainings and SEA runs take about 11 minutes (the
clean training about 2, the robust ones about 3.5 with two at a time, the four
SEA runs about 5.5), and a corruption run (the 15 corruptions at 5 severities
of 24 images) about 20 s with one thread. The SEA settings are reduced
from the paper's (``--sea-iters 300``, all 100 images, more radii), the
corruptions are evaluated on the SEA images only, and the report says which
settings were used.
"""

import argparse
import glob
import json
import os
import os.path as osp
import re
import signal
import subprocess
import sys
import time
import warnings
from datetime import datetime

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# setuptools < 81 is pinned (mmengine imports pkg_resources); its deprecation notice
# is not for the demo's user
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
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

#: The cost model of the ETA, measured on a 2-core x86-64 CPU
#: (2026-11-30, with the other core busy): seconds per unit of one job
#: running with one thread. Units: a training iteration, and one SEA iteration (its
#: three attacks) of one image at one eps. Once the demo runs, the ETA is rescaled
#: to the speed measured so far, so only the ratios matter then.
TRAIN_COST = {'clean': 0.135, 'PIR-AT': 0.30, 'SAT': 0.27, 'DDC-AT': 0.54}
SEA_COST = {'clean': 0.026, 'PIR-AT': 0.0287, 'SAT': 0.0287, 'DDC-AT': 0.0287}
#: seconds per image pass (one image corrupted, loaded and segmented) of a
#: corruption run with one thread; measured on a 2-core x86-64 CPU (2026-12-06,
#: the 15 benchmark corruptions at 5 severities of 24 images in 13 s, the
#: numba compilation of glass_blur included, with the other core busy)
CORRUPTION_COST = 0.0075
#: speed-up of one job from 1 to n threads (the rest of the cores idle); measured
#: for the small model's forward and backward passes (1.3-1.4 with 2 threads; the
#: training loop gains less, which TRAIN_COST['clean'], run with 2 threads, absorbs)
SPEEDUP = {1: 1.0, 2: 1.35}
#: one-off seconds per job (interpreter, imports, building the runner)
STARTUP = 11.0
#: progress lines per batch and eps of a SEA run (tools/test.py's log): per attack
#: one when it starts and one per APGD stage (3)
SEA_LINES_PER_EPS = 3 * (1 + 3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument('--work-dir', default=osp.join('work_dirs', 'demo'))
    p.add_argument(
        '--train-root',
        default='work_dirs',
        help="trainings with the configs' iterations go to TRAIN_ROOT/<config "
        'name> (where tools/train.py puts them)',
    )
    p.add_argument('--data-root', default=osp.join('data', 'synthetic_shapes'))
    p.add_argument(
        '--jobs',
        type=int,
        default=None,
        help='trainings/evaluations run in parallel (default: --cores)',
    )
    p.add_argument(
        '--cores',
        type=int,
        default=os.cpu_count() or 1,
        help='cores shared by the jobs (fewer on a busy machine: a job with more '
        'threads than it gets cores runs many times slower)',
    )
    p.add_argument(
        '--clean-iters', type=int, default=None, help="default: the config's"
    )
    p.add_argument(
        '--at-iters',
        type=int,
        default=None,
        help="adversarial training iterations per robust model (default: the configs')",
    )
    p.add_argument(
        '--eps',
        type=float,
        nargs='+',
        default=[4, 8],
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
        default=24,
        help='validation images evaluated with SEA and the corruptions (all: 100)',
    )
    p.add_argument(
        '--corruptions',
        default='benchmark',
        help='common corruptions evaluated on the SEA images (evaluator.corruptions '
        'of evaluator=Corruptions: benchmark (the 15), all (19), a category noise|'
        'blur|weather|digital|holdout, or comma-separated names; none: skip)',
    )
    p.add_argument(
        '--severities',
        type=int,
        nargs='+',
        default=[1, 2, 3, 4, 5],
        help='corruption severities (1-5)',
    )
    p.add_argument(
        '--grid-images', type=int, default=4, help='rows of each picture grid'
    )
    p.add_argument(
        '--poll', type=float, default=10.0, help='seconds between progress lines'
    )
    args = p.parse_args(argv)
    if args.corruptions.strip().lower() != 'none':
        from mmseg_robust.datasets.corruptions import (
            resolve_corruptions,
            resolve_severities,
        )

        try:
            resolve_corruptions(args.corruptions)
            resolve_severities(args.severities)
        except ValueError as e:
            p.error(f'--corruptions/--severities: {e}')
    return args


def config_iters(config: str) -> int:
    """``train_cfg.max_iters`` of a synthetic config (read without building)."""
    from mmengine.config import Config

    return int(Config.fromfile(osp.join(CONFIG_DIR, config)).train_cfg.max_iters)


class Job:
    """One subprocess of the demo: a training, a SEA run or a corruption run."""

    def __init__(
        self, name, cmd, log, cost, deps=(), threads='share', lines_per_batch=None
    ):
        self.name, self.cmd, self.log, self.cost = name, cmd, log, cost
        self.lines_per_batch = lines_per_batch
        self.deps = list(deps)
        #: 'all': every core; 'share': cores // jobs, fixed; 'dynamic': the rest
        self.threads = threads
        self.proc = self.file = None
        self.started = None
        self.done = False
        self.frac0 = self.frac = 0.0  # progress when started / now
        self.warm = False  # past its start-up (imports, building the runner)

    def threads_file(self):
        return self.log + '.threads'

    def progress(self, fraction=False):
        return progress(self.log, fraction, self.lines_per_batch)


def allocate(jobs, cores: int, slots: int) -> dict:
    """Threads per running job: fixed ones first, the rest shared by the
    dynamic ones (a lone SEA run gets every core)."""
    out = {}
    for j in jobs:
        if j.threads == 'all':
            out[j.name] = cores
        elif j.threads == 'share':
            out[j.name] = max(1, cores // max(1, slots))
    dynamic = [j for j in jobs if j.threads == 'dynamic']
    free = max(0, cores - sum(out.values()))
    for i, j in enumerate(dynamic):
        out[j.name] = max(1, free // len(dynamic) + (i < free % len(dynamic)))
    return out


def speed(threads: int) -> float:
    """Work per second of a job with ``threads`` threads (1 thread: 1)."""
    if threads in SPEEDUP:
        return SPEEDUP[threads]
    top = max(SPEEDUP)
    return SPEEDUP[top] * threads / top


def priorities(jobs: dict) -> dict:
    """Cost of the longest chain from each job to the end (critical path)."""
    succ = {n: [m for m, j in jobs.items() if n in j.deps] for n in jobs}
    memo = {}

    def chain(n):
        if n not in memo:
            j = jobs[n]
            rest = 0.0 if j.done else j.cost * (1 - j.frac) + STARTUP
            memo[n] = rest + max((chain(m) for m in succ[n]), default=0.0)
        return memo[n]

    return {n: chain(n) for n in jobs}


def pick(jobs: dict, running: list, slots: int) -> list:
    """The jobs to start now: ready ones, longest chain first."""
    prio = priorities(jobs)
    ready = [
        n
        for n, j in jobs.items()
        if not j.done and n not in running and all(jobs[d].done for d in j.deps)
    ]
    ready.sort(key=lambda n: -prio[n])
    return ready[: max(0, slots - len(running))]


def simulate(jobs: dict, running: list, cores: int, slots: int) -> float:
    """Seconds (on the reference machine) until every job is done, by the
    scheduler's own rules."""
    left = {
        n: j.cost * (1 - j.frac) + (0.0 if j.warm else STARTUP)
        for n, j in jobs.items()
        if not j.done
    }
    done = {n for n, j in jobs.items() if j.done}
    run = [n for n in running if n in left]
    t = 0.0
    while left:

        class _J:  # the view pick() and allocate() need
            def __init__(self, n):
                self.name, self.deps = n, jobs[n].deps
                self.threads, self.cost = jobs[n].threads, left.get(n, 0.0)
                self.done, self.frac = n in done, 0.0

        view = {n: _J(n) for n in jobs}
        run += pick(view, run, slots)
        if not run:  # cannot happen with a valid graph
            break
        th = allocate([view[n] for n in run], cores, slots)
        rate = {n: speed(th[n]) for n in run}
        dt = min(left[n] / rate[n] for n in run)
        t += dt
        for n in list(run):
            left[n] -= dt * rate[n]
            if left[n] <= 1e-9:
                del left[n]
                done.add(n)
                run.remove(n)
    return t


def fmt(secs: float) -> str:
    secs = int(max(secs, 0))
    return f'{secs // 60}:{secs % 60:02d}'


class Demo:
    def __init__(self, args):
        self.args = args
        self.work = osp.abspath(args.work_dir)
        self.train_root = osp.abspath(args.train_root)
        self.data_root = osp.abspath(args.data_root)
        self.cores = max(1, args.cores)
        self.t0 = time.time()
        self._default_iters = {}

    # ------------------------------------------------------------- helpers
    def say(self, msg: str) -> None:
        secs = int(time.time() - self.t0)
        print(f'[demo {secs // 60:02d}:{secs % 60:02d}] {msg}', flush=True)

    def data_opts(self):
        return [
            f'{loader}.dataset.data_root={self.data_root}'
            for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
        ]

    def default_iters(self, model):
        if model not in self._default_iters:
            self._default_iters[model] = config_iters(MODELS[model][0])
        return self._default_iters[model]

    def iters(self, model):
        given = self.args.clean_iters if model == 'clean' else self.args.at_iters
        return self.default_iters(model) if given is None else given

    def train_dir(self, model):
        iters = self.iters(model)
        if iters == self.default_iters(model):
            # where `tools/train.py CONFIG` writes, and the robust configs'
            # load_from expects the clean model
            return osp.join(self.train_root, osp.splitext(MODELS[model][0])[0])
        return osp.join(self.work, 'train', f'{model}-{iters}it')

    def checkpoint(self, model):
        return osp.join(self.train_dir(model), f'iter_{self.iters(model)}.pth')

    def sea_dir(self, model):
        return osp.join(self.work, 'sea', model)

    # -------------------------------------------------------------- the jobs
    def train_cmd(self, model, load_from=None):
        config, _ = MODELS[model]
        iters = self.iters(model)
        opts = ['default_hooks.logger.interval=10']
        if iters != self.default_iters(model):
            opts += [
                f'train_cfg.max_iters={iters}',
                f'train_cfg.val_interval={iters}',
                f'param_scheduler.1.end={iters}',
                # intermediate checkpoints, so that an interrupted run resumes
                f'default_hooks.checkpoint.interval={max(iters // 4, 1)}',
            ]
        # Resume from the work dir's last checkpoint if an interrupted run left
        # one; otherwise start (robust models: from the clean model's weights).
        # (mmengine's --resume with load_from set would resume *from* load_from.)
        resume = osp.isfile(osp.join(self.train_dir(model), 'last_checkpoint'))
        if resume:
            opts.append('load_from=None')
        elif model != 'clean':
            opts.append(f'load_from={load_from}')
        cmd = ['tools/train.py', osp.join(CONFIG_DIR, config)]
        cmd += ['--work-dir', self.train_dir(model)]
        if resume:
            cmd.append('--resume')
        return cmd + ['--cfg-options'] + opts + self.data_opts()

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

    def corruption_dir(self, model):
        return osp.join(self.work, 'corruptions', model)

    def corruption_settings(self):
        """What the corruption runs evaluate (None: ``--corruptions none``)."""
        if self.args.corruptions.strip().lower() == 'none':
            return None
        from mmseg_robust.datasets.corruptions import (
            resolve_corruptions,
            resolve_severities,
        )

        return dict(
            names=resolve_corruptions(self.args.corruptions),
            severities=resolve_severities(self.args.severities),
            images=self.args.sea_images,
        )

    def corruption_result(self, model):
        """The newest corruption results file of ``model`` with the demo's
        settings."""
        want = self.corruption_settings()
        for path in sorted(
            glob.glob(osp.join(self.corruption_dir(model), 'robustness_*.json')),
            reverse=True,
        ):
            from mmseg_robust.evaluation import load_results

            try:
                res = load_results(path)
            except ValueError:  # not a results file (or cut short): skip it
                continue
            info = res.corruptions or {}
            got = dict(
                names=list(info.get('names') or []),
                severities=list(info.get('severities') or []),
                images=res.summary.get('num_images'),
            )
            if got == want:
                return path
        return None

    def corruption_cmd(self, model):
        s = self.corruption_settings()
        return [
            'tools/test.py',
            osp.join(CONFIG_DIR, MODELS[model][0]),
            self.checkpoint(model),
            '--work-dir',
            self.corruption_dir(model),
            '--cfg-options',
            'evaluator=Corruptions',
            f'evaluator.corruptions={self.args.corruptions}',
            f'evaluator.severities=[{",".join(map(str, s["severities"]))}]',
            f'test_dataloader.dataset.indices={s["images"]}',
            'test_dataloader.batch_size=8',
        ] + self.data_opts()

    def sea_cmd(self, model):
        s = self.sea_settings()
        eps = ','.join(f'{e:g}' for e in s['eps'])
        return [
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

    def jobs(self) -> dict:
        """The demo's jobs still to run, with their dependencies and costs."""
        s = self.sea_settings()
        jobs = {}
        for m in MODELS:
            name = f'train {m}'
            if osp.isfile(self.checkpoint(m)):
                self.say(f'{name}: already trained: {self.checkpoint(m)}')
            else:
                jobs[name] = Job(
                    name,
                    self.train_cmd(m, self.checkpoint('clean')),
                    osp.join(self.train_dir(m), 'train.log'),
                    TRAIN_COST[m] * self.iters(m),
                    deps=[] if m == 'clean' else ['train clean'],
                    threads='all' if m == 'clean' else 'share',
                )
        for m in MODELS:
            name = f'SEA {m}'
            path = self.sea_result(m)
            if path is not None:
                self.say(f'{name}: already evaluated: {path}')
                continue
            jobs[name] = Job(
                name,
                self.sea_cmd(m),
                osp.join(self.sea_dir(m), 'test.log'),
                SEA_COST[m] * s['images'] * s['steps'] * len(s['eps']),
                deps=[f'train {m}'],
                threads='dynamic',
                lines_per_batch=SEA_LINES_PER_EPS * len(s['eps']),
            )
        c = self.corruption_settings()
        for m in MODELS if c else ():
            name = f'corruptions {m}'
            path = self.corruption_result(m)
            if path is not None:
                self.say(f'{name}: already evaluated: {path}')
                continue
            passes = 1 + len(c['names']) * len(c['severities'])
            jobs[name] = Job(
                name,
                self.corruption_cmd(m),
                osp.join(self.corruption_dir(m), 'test.log'),
                CORRUPTION_COST * c['images'] * passes,
                deps=[f'train {m}'],
                threads='dynamic',
            )
        for j in jobs.values():  # dependencies already met
            j.deps = [d for d in j.deps if d in jobs]
        return jobs

    # ------------------------------------------------------------ the runner
    def env(self, threads: int) -> dict:
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(threads),
            MKL_NUM_THREADS=str(threads),
            PYTHONUNBUFFERED='1',
        )
        env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
        return env

    def set_threads(self, job: Job, threads: int) -> None:
        with open(job.threads_file(), 'w') as f:
            f.write(str(threads))
        # the child installs its handler first thing and then says so
        if job.proc is not None and osp.isfile(job.threads_file() + '.ready'):
            try:
                job.proc.send_signal(signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def start(self, job: Job, threads: int) -> None:
        os.makedirs(osp.dirname(job.log), exist_ok=True)
        for f in (job.threads_file(), job.threads_file() + '.ready'):
            if osp.exists(f):
                os.remove(f)
        self.set_threads(job, threads)
        job.file = open(job.log, 'a')
        # progress() reads only what follows the last marker
        job.file.write(f'{_MARKER} {datetime.now().isoformat()}\n')
        job.file.flush()
        cmd = [sys.executable, osp.abspath(__file__), '--run-tool']
        cmd += [job.threads_file()] + job.cmd
        job.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=self.env(threads),
            stdout=job.file,
            stderr=subprocess.STDOUT,
        )
        job.started = time.time()
        job.frac0 = job.frac = job.progress(fraction=True)[1]

    def run_jobs(self, jobs: dict) -> None:
        """Run the jobs, ``--jobs`` at a time, with progress lines and ETAs."""
        slots = max(1, self.args.jobs or self.cores)
        running, failed, threads = [], [], {}
        last = 0.0
        # calibration: core-seconds given vs reference work done
        given = done = 0.0
        t_prev = time.time()
        self.etas = []
        t_start = time.time()
        eta0 = simulate(jobs, running, self.cores, slots)
        self.say(
            f'{len(jobs)} job(s), {slots} at a time on {self.cores} core(s); '
            f'first estimate {fmt(eta0)} (reference machine)'
        )
        while any(not j.done for j in jobs.values()) and not failed:
            for n in pick(jobs, running, slots):
                running.append(n)
                alloc = allocate([jobs[r] for r in running], self.cores, slots)
                self.start(jobs[n], alloc[n])
                threads[n] = alloc[n]
                self.say(f'{n}: started ({alloc[n]} thread(s)), log {jobs[n].log}')
            time.sleep(1.0)
            now = time.time()
            for n in list(running):
                j = jobs[n]
                old = j.frac
                text, frac = j.progress(fraction=True)
                j.frac = max(j.frac, frac)
                done += (j.frac - old) * j.cost
                if not j.warm and text != 'starting':
                    # its first progress line: the start-up is over
                    j.warm = True
                    done += STARTUP
                given += (now - t_prev) * speed(threads[n])
                if j.proc.poll() is None:
                    continue
                j.file.close()
                running.remove(n)
                if j.proc.returncode != 0:
                    failed.append(j)
                    self.say(f'{n}: FAILED (exit {j.proc.returncode}), log: {j.log}')
                    continue
                done += (1 - j.frac) * j.cost + (0.0 if j.warm else STARTUP)
                j.frac, j.done, j.warm = 1.0, True, True
                self.say(f'{n}: done in {fmt(now - j.started)}')
            t_prev = now
            # a job finished: give its cores to the dynamic ones still running
            alloc = allocate([jobs[r] for r in running], self.cores, slots)
            for n in running:
                if alloc[n] != threads[n]:
                    self.set_threads(jobs[n], alloc[n])
                    threads[n] = alloc[n]
            if running and now - last >= self.args.poll:
                last = now
                # rescale the reference ETA to the speed seen so far
                scale = given / done if done > 0.02 * eta0 else 1.0
                eta = scale * simulate(jobs, running, self.cores, slots)
                self.etas.append((now - t_start, eta))
                self.say(
                    ' | '.join(f'{n} {jobs[n].progress()}' for n in running)
                    + f' | ETA {fmt(eta)}'
                )
        for n in running:  # only after a failure: let the others finish
            jobs[n].proc.wait()
            jobs[n].file.close()
        total = time.time() - t_start
        if self.etas:
            errors = [
                f'{100 * (at + eta - total) / (total - at):+.0f}% at {fmt(at)}'
                for at, eta in self.etas[:: max(1, len(self.etas) // 6)]
            ]
            self.say(
                f'jobs took {fmt(total)}; ETA error (predicted - actual '
                f'remaining): {", ".join(errors)}'
            )
            with open(osp.join(self.work, 'eta.json'), 'w') as f:
                json.dump(dict(total=total, etas=self.etas), f)
        if failed:
            tails = '\n'.join(f'--- {j.name}: {j.log}\n' + tail(j.log) for j in failed)
            raise SystemExit(
                f'{[j.name for j in failed]} failed; '
                f'rerun the same command to retry the rest.\n'
                f'{tails}'
            )

    # -------------------------------------------------------------- stages
    def stage_data(self):
        from mmseg_robust.datasets import generate_synthetic_dataset

        if osp.isdir(self.data_root):
            self.say(f'data: found {self.data_root}')
        else:
            self.say(f'data: generating the synthetic dataset in {self.data_root}')
        # checks a folder found (a stale one is refused with a message)
        generate_synthetic_dataset(self.data_root)

    def stage_report(self):
        import torch

        from mmseg_robust.datasets.synthetic import CLASSES, PALETTE
        from mmseg_robust.reporting import (
            load_example,
            load_rows,
            save_picture_grid,
            write_report,
        )

        out = osp.join(self.work, 'report')
        self.say(f'report: writing {out}')
        files = [(self.sea_result(m), m) for m in MODELS]
        if self.corruption_settings():
            files += [(self.corruption_result(m), m) for m in MODELS]
        rows = load_rows([f for f, _ in files], [m for _, m in files])
        s = self.sea_settings()
        c = self.corruption_settings()
        corruptions = (
            {
                'corruptions': f'{self.args.corruptions}, severities '
                + ', '.join(map(str, c['severities']))
                + ', on the SEA images'
            }
            if c
            else {}
        )
        settings = {
            'attack': 'SEA (APGD with Mask-CE-Bal, Mask-CE, JS-Avg; worst case)',
            'iterations per attack': s['steps'],
            'images': s['images'],
            'dataset': 'synthetic shapes (val)',
            'training': (
                f'clean {self.iters("clean")} it; PIR-AT/SAT/DDC-AT '
                f'{self.iters("SAT")} it from the clean model'
            ),
            **corruptions,
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
                    f'report: no saved examples for {m} (evaluated '
                    f'from the cache only); skipping its picture grid'
                )
                continue
            path = osp.join(out, f'examples_{m}.png')
            save_picture_grid(
                [load_example(f) for f in files],
                path,
                PALETTE,
                title=(
                    f'{m}: SEA worst case at ε={eps:g}/255 ({s["steps"]} '
                    f'iterations per attack, {len(files)} of the {s["images"]} '
                    'evaluated images)'
                ),
                class_names=CLASSES,
            )
            paths[f'examples_{m}'] = path
        for k, v in paths.items():
            self.say(f'report: {k}: {v}')
        return paths

    def run(self):
        self.say(f'work dir {self.work}; trainings in {self.train_root}')
        os.makedirs(self.work, exist_ok=True)
        self.stage_data()
        jobs = self.jobs()
        if jobs:
            self.run_jobs(jobs)
        paths = self.stage_report()
        self.say(f'done in {fmt(time.time() - self.t0)}')
        return paths


_MARKER = '=== tools/demo.py started this job at'
_ITER = re.compile(
    r'Iter\((?:train|val|test)\)\s*\[\s*(\d+)/(\d+)\].*?'
    r'eta: (\S+)'
)
_ROBUST = re.compile(r'Robustness \[(\d+)/(\d+) batches\] (.*)')
_ATTACK = re.compile(r'(?:running|last attack) (eps [^,]+)')
_CORRUPTION = re.compile(
    r'Corruptions \[pass (\d+)/(\d+): ([^,]+), batch \d+/\d+\] image passes '
    r'computed on this rank: (\d+)/(\d+), ETA (\S+)'
)


def progress(log: str, fraction: bool = False, lines_per_batch: int | None = None):
    """A short progress string from a tools/train.py or tools/test.py log (with
    ``fraction``: ``(string, fraction done)``). A corruption run's fraction is
    its image passes computed against those to compute. Within a batch of a SEA
    run the fraction counts its progress lines (an attack or an APGD stage
    started) against those of a finished batch, or ``lines_per_batch`` before
    one has finished."""
    try:
        with open(log, errors='replace') as f:
            lines = f.readlines()
    except OSError:
        lines = []
    starts = [i for i, line in enumerate(lines) if line.startswith(_MARKER)]
    lines = lines[starts[-1] + 1 if starts else 0 :][-400:]
    text, frac = 'starting', 0.0
    robust = [m.groups() for m in map(_ROBUST.search, lines) if m]
    corrupted = [m.groups() for m in map(_CORRUPTION.search, lines) if m]
    if corrupted:
        u_done, u_total, unit, done, total, eta = corrupted[-1]
        text = f'pass {u_done}/{u_total} ({unit}) ETA {eta}'
        frac = int(done) / max(int(total), 1)
    elif robust:
        done, total, rest = robust[-1]
        done, total = int(done), int(total)
        attack = _ATTACK.search(rest)
        # the ETA is on the per-batch lines, the attack running on every line
        etas = [re.search(r'ETA (\S+)', r[2]) for r in robust]
        eta = next((e.group(1) for e in reversed(etas) if e), None)
        text = (
            f'batch {done}/{total}'
            + (f' {attack.group(1)}' if attack else '')
            + (f' ETA {eta}' if eta else '')
        )
        # within a batch: its attacks and stages started so far
        finished = 'images done' in rest
        lines = {}
        for b, _, r in robust:
            if 'images done' not in r:
                lines.setdefault(int(b), set()).add(r)
        full = [len(v) for b, v in lines.items() if b < done]
        started = len(lines.get(done, ()))
        per_batch = max(full) if full else lines_per_batch or started + 1
        within = 1.0 if finished else min(started / max(per_batch, 1), 0.95)
        frac = (done - 1 + within) / total
    else:
        for line in reversed(lines):
            m = _ITER.search(line)
            if m and 'Iter(train)' in line:
                i, n = int(m.group(1)), int(m.group(2))
                text, frac = f'iter {i}/{n} ETA {m.group(3)}', i / n
                break
    return (text, min(max(frac, 0.0), 1.0)) if fraction else text


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


def run_tool(threads_file: str, script: str, *args: str) -> None:
    """Run ``script`` (tools/train.py or tools/test.py) in this process with the
    number of torch threads in ``threads_file``, read again on SIGUSR1 (the
    handler runs in the main thread, between two torch operations)."""
    import runpy

    import torch

    def apply(*_):
        try:
            with open(threads_file) as f:
                n = int(f.read().strip())
        except (OSError, ValueError):
            return
        if n > 0 and n != torch.get_num_threads():
            torch.set_num_threads(n)

    signal.signal(signal.SIGUSR1, apply)
    apply()
    with open(threads_file + '.ready', 'w') as f:
        f.write(str(os.getpid()))
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name='__main__')
    finally:
        # a late signal must not kill the exiting process (Python restores the
        # default action, termination, of the handlers it set when it exits)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def main(argv=None):
    os.chdir(REPO)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--run-tool']:
        return run_tool(*argv[1:])
    return Demo(parse_args(argv)).run()


if __name__ == '__main__':
    main()
