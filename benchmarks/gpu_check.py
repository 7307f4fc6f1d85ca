"""GPU readiness check: install the stack offline, then time SEA and adversarial
training on a paper-size model and train end to end with AMP, each step under its own
timeout, writing one JSON per step and a summary. Run it through
``benchmarks/gpu_check.sh`` (see there and docs/gpu_check.md).

    python benchmarks/gpu_check.py [OUT_DIR] [--cpu] [--wheels DIR] [--deadline S]
        [--timeout STEP=SECONDS ...] [--force-install]

Steps, in order (a step whose prerequisite failed is skipped, and a step that would
start after ``--deadline`` seconds is skipped too; both count as failures). The
default call runs all but the two ``cheaper_passes`` steps; ``--cheaper-passes``
runs env, install, data, amp_train (only without the demo checkpoint) and the two
``cheaper_passes`` steps, a second call (together they would not fit one
deadline); the steps a call leaves to the other are skipped as expected:

    env          python/torch/CUDA versions, the GPU (CUDA required unless --cpu)
    install      the copied wheels, then mmcv (a copied prebuilt wheel, else compiled
                 from its sdist with CPU ops only); skipped if already importable
    data         the synthetic dataset (generated on first use)
    amp_train    tools/train.py --amp, PIR-AT on the synthetic data, 5 iterations
    sea          benchmarks/bench_sea.py, UperNet-ConvNeXt-T, 8 x 512x512
    adversarial_training      benchmarks/bench_adversarial_training.py, same model
    adversarial_training_amp  the same with --amp
    cheaper_passes_speed     benchmarks/cheaper_passes.py --size 512, the pass time
                 of UperNet-ConvNeXt-T (random weights, 8 x 512x512) with channels_last,
                 bf16, both, and compile (inductor), against plain fp32
    cheaper_passes_strength  the same script on the demo's UperNet-ConvNeXt-micro and
                 the synthetic data: pass time and the change of a reduced SEA with
                 channels_last, compile and bf16 (the demo's PIR-AT checkpoint when
                 present, else amp_train's)

``--cpu`` runs the same steps with tiny sizes on the CPU (CUDA hidden from the
children; ``amp_train`` trains without --amp, ``adversarial_training_amp`` is skipped:
mmengine's AmpOptimWrapper needs CUDA; the ``cheaper_passes`` steps measure
channels_last only: bf16 needs CUDA and inductor compiles for about a minute on a
small CPU), to check the logic and the JSON on any machine.

OUT_DIR (default ``work_dirs/gpu_check``) receives at most 10 files: ``summary.json``,
``<step>.json`` for the eight steps after ``env`` and ``gpu_check.log``
(every step's output). Only the standard library is imported here: the stack may not
be installed yet. Exit status 0 when every step passed (or was skipped as expected in
--cpu mode), else 1.
"""

import argparse
import datetime
import glob
import json
import math
import os
import os.path as osp
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PAPER_CONFIG = (
    'configs/pirat/upernet_convnext-t-cvst_pirat_8xb16-128e_ade20k151-512x512.py'
)
TRAIN_CONFIG = 'configs/synthetic/upernet_convnext-micro_pirat_synthetic.py'
DATA_ROOT = 'data/synthetic_shapes'  # the synthetic configs' data_root
# seconds; the sum is bounded by --deadline
TIMEOUTS = dict(
    env=60,
    install=300,
    data=60,
    amp_train=150,
    sea=180,
    adversarial_training=120,
    adversarial_training_amp=120,
    cheaper_passes_speed=180,
    cheaper_passes_strength=200,
)
# (GPU, CPU) arguments of the benchmarks
SEA_ARGS = (
    ['--config', PAPER_CONFIG, '--batch', '8', '--size', '512', '--iters', '15']
    + ['--repeats', '3', '--device', 'cuda'],
    ['--batch', '2', '--size', '32', '--iters', '2', '--repeats', '1']
    + ['--device', 'cpu'],
)
AT_ARGS = (
    ['--model-config', PAPER_CONFIG, '--size', '512', '--batch', '8']
    + ['--steps', '1', '2', '5', '--repeats', '3'],
    ['--batch', '2', '--steps', '1', '--repeats', '1'],
)
#: the steps of ``--cheaper-passes`` (a second call)
CHEAPER_STEPS = ('cheaper_passes_speed', 'cheaper_passes_strength')
#: the demo's PIR-AT checkpoint (make demo); amp_train's when it is missing
DEMO_CHECKPOINT = 'work_dirs/upernet_convnext-micro_pirat_synthetic/iter_300.pth'
CHEAPER_SPEED_ARGS = (
    ['--config', PAPER_CONFIG, '--size', '512', '--batch', '8', '--no-strength']
    + ['--device', 'cuda', '--repeats', '10', '--options', 'channels_last', 'bf16']
    + ['channels_last+bf16', 'compile'],
    ['--config', PAPER_CONFIG, '--size', '32', '--batch', '2', '--no-strength']
    + ['--device', 'cpu', '--repeats', '2', '--options', 'channels_last'],
)
CHEAPER_STRENGTH_ARGS = (
    ['--device', 'cuda', '--options', 'channels_last', 'compile', 'bf16']
    + ['--repeats', '10', '--steps', '20', '--images', '8', '--batch', '8'],
    ['--device', 'cpu', '--options', 'channels_last', '--repeats', '2']
    + ['--steps', '2', '--images', '2', '--batch', '2'],
)
TRAIN_ITERS = (5, 2)
SUMMARY_KEYS = ('status', 'seconds', 'timeout_s', 'rc', 'reason')

ENV_CODE = r"""
import json, os, platform, sys
import torch
cuda = torch.cuda.is_available()
info = dict(
    python=platform.python_version(),
    executable=sys.executable,
    torch=torch.__version__,
    torch_cuda=torch.version.cuda,
    cudnn=torch.backends.cudnn.version() if cuda else None,
    cuda_available=cuda,
    device=torch.cuda.get_device_name(0) if cuda else 'cpu',
    capability=str(torch.cuda.get_device_capability(0)) if cuda else None,
    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    if cuda else None,
    cpu_count=os.cpu_count(),
)
for name in ('torchvision', 'numpy', 'setuptools'):
    try:
        info[name] = __import__(name).__version__
    except Exception as e:
        info[name] = f'missing ({type(e).__name__})'
print('GPU_CHECK_ENV ' + json.dumps(info))
if os.environ.get('GPU_CHECK_NEED_CUDA') == '1' and not cuda:
    sys.exit('CUDA is not available to torch')
"""
IMPORT_CHECK = (
    'import mmcv, mmcv.ops, mmengine, mmseg, mmpretrain, ftfy, pkg_resources; '
    "assert mmcv.__version__ == '2.1.0', mmcv.__version__; "
    "print('stack: mmcv', mmcv.__version__, 'mmengine', mmengine.__version__, "
    "'mmseg', mmseg.__version__, 'mmpretrain', mmpretrain.__version__)"
)


class Check:
    def __init__(self, args):
        self.args = args
        self.cpu = args.cpu
        self.out = args.out_dir
        self.work = tempfile.mkdtemp(prefix='gpu_check_')
        self.start = time.monotonic()
        self.log = open(osp.join(self.out, 'gpu_check.log'), 'w')
        self.steps = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED='1')
        self.env['PYTHONPATH'] = os.pathsep.join(
            p for p in (REPO, os.environ.get('PYTHONPATH')) if p
        )
        if self.cpu:
            self.env['CUDA_VISIBLE_DEVICES'] = ''
        else:
            self.env['GPU_CHECK_NEED_CUDA'] = '1'
        self.info = {}

    # -- running one step -------------------------------------------------------
    def say(self, text):
        line = f'[gpu_check {time.monotonic() - self.start:6.1f}s] {text}'
        print(line, flush=True)
        self.log.write(line + '\n')
        self.log.flush()

    def run(self, name, cmd, env=None):
        """Run ``cmd`` (list, or str for bash) in its own process group under the
        step's timeout (capped by the deadline); tee its output to the log."""
        left = self.args.deadline - (time.monotonic() - self.start)
        timeout = min(self.args.timeouts[name], left)
        if timeout < 10:
            return dict(status='skipped', reason='deadline reached', rc=None)
        if isinstance(cmd, str):
            cmd = ['bash', '-c', 'set -euo pipefail; ' + cmd]
        self.say(f'{name}: {" ".join(cmd)} (timeout {timeout:.0f} s)')
        tail = []
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env or self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
            errors='replace',
        )

        def pump():
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                self.log.write(line)
                tail.append(line)
                del tail[:-40]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        reader.join(timeout=5)
        self.log.flush()
        seconds = round(time.monotonic() - t0, 1)
        status = 'passed' if proc.returncode == 0 else 'failed'
        status = 'timeout' if timed_out else status
        return dict(
            status=status,
            rc=proc.returncode,
            seconds=seconds,
            timeout_s=round(timeout),
            command=' '.join(cmd),
            log_tail=''.join(tail)[-4000:] if status != 'passed' else None,
        )

    def record(self, name, res, result=None, write=True):
        res = dict(step=name, **res)
        if result is not None:
            res['result'] = result
        self.steps[name] = res
        if write:
            with open(osp.join(self.out, f'{name}.json'), 'w') as f:
                json.dump(res, f, indent=1)
        self.say(f'{name}: {res["status"]} ({res.get("seconds", 0)} s)')
        return res['status'] == 'passed'

    def skip(self, name, reason, expected=False):
        status = 'skipped' if expected else 'not run'
        return self.record(name, dict(status=status, reason=reason, rc=None))

    # -- the steps ----------------------------------------------------------------
    def step_env(self):
        res = self.run('env', [sys.executable, '-c', ENV_CODE])
        info = self._env_from_log()
        if shutil.which('nvidia-smi') and not self.cpu:
            try:
                smi = subprocess.run(
                    [
                        'nvidia-smi',
                        '--query-gpu=name,driver_version,memory.total',
                        '--format=csv,noheader',
                    ],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
                info['nvidia_smi'] = smi.stdout.strip()
            except (subprocess.SubprocessError, OSError) as e:
                info['nvidia_smi'] = f'failed: {e}'
        self.info = info
        return self.record('env', res, info, write=False)

    def _env_from_log(self):
        self.log.flush()
        with open(self.log.name) as f:
            for line in f:
                if line.startswith('GPU_CHECK_ENV '):
                    return json.loads(line[len('GPU_CHECK_ENV ') :])
        return {}

    def step_install(self):
        try:
            probe = subprocess.run(
                [sys.executable, '-c', IMPORT_CHECK],
                cwd=REPO,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        except subprocess.TimeoutExpired:
            probe = subprocess.CompletedProcess([], 1, '', 'import timed out')
        if probe.returncode == 0 and not self.args.force_install:
            self.say('install: ' + probe.stdout.strip() + ' (already importable)')
            return self.record(
                'install',
                dict(status='passed', rc=0, seconds=0, reason='already installed'),
                dict(stack=probe.stdout.strip()),
            )
        wheels = osp.abspath(self.args.wheels)
        prefix = self.args.prefix
        pure = sorted(
            w
            for w in glob.glob(osp.join(wheels, '*.whl'))
            if not osp.basename(w).startswith('mmcv-')
        )
        prebuilt = sorted(glob.glob(osp.join(wheels, 'mmcv-2.1.0-*.whl')))
        sdist = osp.join(wheels, 'mmcv-2.1.0.tar.gz')
        if not pure:
            return self.record(
                'install',
                dict(
                    status='failed',
                    rc=None,
                    reason=f'no wheels in {wheels}: run benchmarks/gpu_prepare.sh '
                    'on a machine with network and copy benchmarks/gpu_wheels here',
                ),
            )
        py = sys.executable
        pip = f'{py} -m pip install -q --no-index --no-deps --no-cache-dir --upgrade'
        q = ' '.join
        # mmcv: a copied wheel if it imports with this torch, else the sdist with CPU
        # ops only (the models need no mmcv CUDA op; mmcv's setup.py builds CUDA ops
        # whenever torch sees a GPU, so the GPU is hidden from the build)
        mmcv = (
            f'{pip} --target {prefix} {q(prebuilt)} && {py} -c "import mmcv.ops" || '
            if prebuilt
            else ''
        )
        mmcv += (
            f'(test -f {sdist} && echo "compiling mmcv 2.1.0 (CPU ops, '
            f'MAX_JOBS=$(nproc))" && CUDA_VISIBLE_DEVICES= MMCV_WITH_OPS=1 '
            f'FORCE_CUDA=0 MAX_JOBS=$(nproc) {pip} --no-build-isolation '
            f'--target {prefix} {sdist})'
        )
        cmd = (
            f'mkdir -p {prefix}; export PYTHONPATH={prefix}:$PYTHONPATH; '
            f'{pip} --target {prefix} {q(pure)}; '
            f'{py} -c "import sysconfig, os.path as p; '
            "i = sysconfig.get_paths()['include']; "
            "print('Python.h in', i, p.exists(p.join(i, 'Python.h')))\"; "
            f'{mmcv}; {py} -c "{IMPORT_CHECK}"'
        )
        env = dict(self.env, PYTHONPATH=self.env['PYTHONPATH'])
        res = self.run('install', cmd, env=env)
        if res['status'] == 'passed':
            self.env['PYTHONPATH'] = os.pathsep.join((prefix, self.env['PYTHONPATH']))
        return self.record('install', res, dict(prefix=prefix, prebuilt_mmcv=prebuilt))

    def step_data(self):
        code = (
            'from mmseg_robust.datasets import generate_synthetic_dataset as g; '
            f"print('synthetic data in', g({DATA_ROOT!r}))"
        )
        return self.record('data', self.run('data', [sys.executable, '-c', code]))

    def step_amp_train(self):
        iters = TRAIN_ITERS[self.cpu]
        work_dir = osp.join(self.work, 'amp_train')
        cmd = [sys.executable, 'tools/train.py', TRAIN_CONFIG, '--work-dir', work_dir]
        cmd += [] if self.cpu else ['--amp']
        cmd += [
            '--cfg-options',
            f'train_cfg.max_iters={iters}',
            'load_from=None',
            'default_hooks.logger.interval=1',
            'train_dataloader.num_workers=2',
        ]
        res = self.run('amp_train', cmd)
        result = dict(amp=not self.cpu, max_iters=iters)
        if res['status'] == 'passed':
            problems = self._check_training(work_dir, iters, result)
            if problems:
                res.update(status='failed', reason='; '.join(problems))
        return self.record('amp_train', res, result)

    def _check_training(self, work_dir, iters, result):
        problems = []
        scalars = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
        rows = []
        if scalars:
            with open(scalars[-1]) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        losses = [r['loss'] for r in rows if 'loss' in r]
        result['losses'] = losses
        result['last_log'] = rows[-1] if rows else None
        if len(losses) != iters:
            problems.append(f'{len(losses)} logged losses, expected {iters}')
        if not all(math.isfinite(v) for v in losses):
            problems.append('non-finite loss')
        dumped = glob.glob(osp.join(work_dir, '*.py'))
        wrapper = None
        if dumped:
            with open(dumped[0]) as f:
                text = f.read()
            wrapper = 'AmpOptimWrapper' if 'AmpOptimWrapper' in text else 'OptimWrapper'
        result['optim_wrapper'] = wrapper
        if wrapper != ('OptimWrapper' if self.cpu else 'AmpOptimWrapper'):
            problems.append(f'optimizer wrapper {wrapper}')
        ckpt = osp.join(work_dir, f'iter_{iters}.pth')
        result['checkpoint_mib'] = (
            round(osp.getsize(ckpt) / 2**20, 2) if osp.exists(ckpt) else None
        )
        if not osp.exists(ckpt):
            problems.append(f'no {osp.basename(ckpt)}')
        return problems

    def step_bench(self, name, script, extra):
        raw = osp.join(self.work, f'{name}.raw.json')
        res = self.run(name, [sys.executable, script, *extra, '--out', raw])
        result = None
        if osp.exists(raw):
            with open(raw) as f:
                result = json.load(f)
        elif res['status'] == 'passed':
            res.update(status='failed', reason='no result JSON written')
        return self.record(name, res, result)

    def step_cheaper_passes_strength(self):
        name = 'cheaper_passes_strength'
        ckpt = osp.join(REPO, DEMO_CHECKPOINT)
        if not osp.exists(ckpt):
            ckpt = osp.join(self.work, 'amp_train', f'iter_{TRAIN_ITERS[self.cpu]}.pth')
        if not osp.exists(ckpt):
            return self.skip(name, f'no checkpoint ({DEMO_CHECKPOINT} nor amp_train)')
        extra = ['--config', TRAIN_CONFIG, '--checkpoint', ckpt]
        extra += ['--data-root', osp.join(REPO, DATA_ROOT)]
        return self.step_bench(
            name,
            'benchmarks/cheaper_passes.py',
            extra + CHEAPER_STRENGTH_ARGS[self.cpu],
        )

    def step_default_benchmarks(self, data_ok):
        """SEA and adversarial training on the paper-size model (the default
        run); the cheaper-passes steps wait for ``--cheaper-passes``."""
        self.step_bench('sea', 'benchmarks/bench_sea.py', SEA_ARGS[self.cpu])
        if data_ok:
            at = 'benchmarks/bench_adversarial_training.py'
            self.step_bench('adversarial_training', at, AT_ARGS[self.cpu])
            if self.cpu:
                self.skip('adversarial_training_amp', 'AMP needs CUDA', True)
            else:
                self.step_bench('adversarial_training_amp', at, AT_ARGS[0] + ['--amp'])
        else:
            for name in ('adversarial_training', 'adversarial_training_amp'):
                self.skip(name, 'data failed')
        for name in CHEAPER_STEPS:
            self.skip(name, 'a second call: gpu_check.sh --cheaper-passes', True)

    def step_cheaper_passes(self, data_ok):
        """The ``evaluator.speedups`` steps (``--cheaper-passes``); the default
        run's benchmarks are left to it."""
        for name in ('sea', 'adversarial_training', 'adversarial_training_amp'):
            self.skip(name, 'the default call (without --cheaper-passes)', True)
        self.step_bench(
            'cheaper_passes_speed',
            'benchmarks/cheaper_passes.py',
            CHEAPER_SPEED_ARGS[self.cpu],
        )
        if data_ok:
            self.step_cheaper_passes_strength()
        else:
            self.skip('cheaper_passes_strength', 'data failed')

    # -- all ------------------------------------------------------------------
    def main(self):
        mode = 'cpu (tiny sizes)' if self.cpu else 'gpu'
        if self.args.cheaper_passes:
            mode += ', --cheaper-passes'
        self.say(f'mode {mode}, out {self.out}, deadline {self.args.deadline} s')
        ok = {'env': self.step_env()}
        ok['install'] = ok['env'] and self.step_install()
        if not ok['env']:
            self.skip('install', 'env failed')
        if ok['install']:
            ok['data'] = self.step_data()
            if not ok['data']:
                self.skip('amp_train', 'data failed')
            elif self.args.cheaper_passes and osp.exists(
                osp.join(REPO, DEMO_CHECKPOINT)
            ):
                self.skip('amp_train', 'the demo checkpoint is there', True)
            else:
                self.step_amp_train()
            if self.args.cheaper_passes:
                self.step_cheaper_passes(ok['data'])
            else:
                self.step_default_benchmarks(ok['data'])
        else:
            for name in TIMEOUTS:
                if name not in self.steps:
                    self.skip(name, 'install failed' if ok['env'] else 'env failed')
        failed = [
            n for n, s in self.steps.items() if s['status'] not in ('passed', 'skipped')
        ]
        summary = dict(
            passed=not failed,
            failed_steps=failed,
            mode=mode,
            date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            device=self.info.get('device'),
            torch=self.info.get('torch'),
            cuda=self.info.get('torch_cuda'),
            env=self.info,
            total_s=round(time.monotonic() - self.start, 1),
            deadline_s=self.args.deadline,
            steps={
                n: {k: s.get(k) for k in SUMMARY_KEYS} for n, s in self.steps.items()
            },
            headline=self._headline(),
        )
        with open(osp.join(self.out, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=1)
        self.say(
            ('PASSED' if not failed else f'FAILED: {", ".join(failed)}')
            + f' in {summary["total_s"]} s; {self.out}/summary.json'
        )
        self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)
        return 0 if not failed else 1

    def _headline(self):
        """The numbers worth quoting, from the step results."""
        out = {}
        sea = (self.steps.get('sea') or {}).get('result')
        if sea:
            out['sea_per_iteration_ratio'] = {
                k: round(v['ratio'], 3) for k, v in sea['attacks'].items()
            }
            out['sea_bare_pass_ms'] = round(
                1e3 * min(v['bare_s'] for v in sea['attacks'].values()), 2
            )
        for name in ('adversarial_training', 'adversarial_training_amp'):
            r = (self.steps.get(name) or {}).get('result')
            if r:
                out[name] = {
                    f'k={k}': dict(
                        clean_ms=round(1e3 * v['clean_s'], 1),
                        adversarial_ms=round(1e3 * v['adversarial_s'], 1),
                        ratio=round(v['ratio'], 2),
                    )
                    for k, v in r['steps'].items()
                }
        for step in ('cheaper_passes_speed', 'cheaper_passes_strength'):
            r = (self.steps.get(step) or {}).get('result')
            if r:
                out[step] = {
                    name: dict(
                        ratio=row['ratio_to_plain'],
                        **{
                            k: (r['strength'].get(name) or {}).get(k)
                            for k in ('mIoU_diff', 'aACC_diff')
                        },
                    )
                    for name, row in r['speed'].items()
                    if name != 'plain'
                }
        return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('out_dir', nargs='?', default='work_dirs/gpu_check')
    parser.add_argument('--cpu', action='store_true', help='tiny sizes on the CPU')
    parser.add_argument('--wheels', default=osp.join(REPO, 'benchmarks', 'gpu_wheels'))
    parser.add_argument(
        '--prefix', default='/tmp/gpu_check_site', help='pip --target of the install'
    )
    parser.add_argument(
        '--deadline', type=float, default=470, help='no step starts or runs past it'
    )
    parser.add_argument(
        '--timeout',
        action='append',
        default=[],
        metavar='STEP=SECONDS',
        help='override one step timeout',
    )
    parser.add_argument(
        '--force-install', action='store_true', help='install even if importable'
    )
    parser.add_argument(
        '--cheaper-passes',
        action='store_true',
        help='run the cheaper_passes steps instead of sea and adversarial_training '
        '(a second call: together they would not fit one deadline)',
    )
    args = parser.parse_args(argv)
    args.timeouts = dict(TIMEOUTS)
    for item in args.timeout:
        step, _, seconds = item.partition('=')
        if step not in TIMEOUTS:
            parser.error(f'unknown step {step!r}; steps: {", ".join(TIMEOUTS)}')
        args.timeouts[step] = float(seconds)
    args.out_dir = osp.abspath(args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    return args


if __name__ == '__main__':
    sys.exit(Check(parse_args()).main())
