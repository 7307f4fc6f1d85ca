"""Train the two extra models of the attack frontier benchmark
(benchmarks/frontier.py) on the synthetic dataset: a small SegFormer (MiT) and a
small DeepLabV3+ (ResNet-18-V1c), each first clean and then with PIR-AT from its
clean checkpoint, as tools/demo.py trains the small UperNet-ConvNeXt.

    python benchmarks/train_frontier_models.py [--archs segformer deeplabv3plus]
        [--clean-iters N] [--at-iters N] [--train-root work_dirs]
        [--data-root data/synthetic_shapes] [--threads T]

Each training is the stock ``tools/train.py`` on a shipped config
(configs/synthetic/<arch>_synthetic.py, then <arch>_pirat_synthetic.py with
``load_from`` the clean checkpoint), run in a subprocess. With the configs'
iterations (clean 1000, PIR-AT 300, the demo's) a model is written where
``tools/train.py CONFIG`` writes it (``TRAIN_ROOT/<config name>/iter_<N>.pth``),
so the PIR-AT configs' ``load_from`` finds the clean model; with other
``--clean-iters``/``--at-iters`` (smoke runs) it goes to
``TRAIN_ROOT/frontier/<config name>-<N>it`` instead. A finished training is
skipped; an interrupted one resumes from its last checkpoint. At the end the
checkpoints are printed and written to ``TRAIN_ROOT/frontier/models.json``
(``{model name: {config, checkpoint}}``), which ``benchmarks/frontier.py
--models-json`` reads.
"""

import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIG_DIR = osp.join('configs', 'synthetic')
#: architecture -> (clean config, PIR-AT config, benchmark model names)
ARCHS = {
    'segformer': (
        'segformer_mit-micro_synthetic.py',
        'segformer_mit-micro_pirat_synthetic.py',
        ('SegFormer-clean', 'SegFormer-PIR-AT'),
    ),
    'deeplabv3plus': (
        'deeplabv3plus_r18-micro_synthetic.py',
        'deeplabv3plus_r18-micro_pirat_synthetic.py',
        ('DeepLabV3+-clean', 'DeepLabV3+-PIR-AT'),
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument('--archs', nargs='+', choices=sorted(ARCHS), default=list(ARCHS))
    p.add_argument(
        '--clean-iters', type=int, default=None, help="default: the config's (1000)"
    )
    p.add_argument(
        '--at-iters', type=int, default=None, help="default: the config's (300)"
    )
    p.add_argument(
        '--train-root',
        default='work_dirs',
        help='where tools/train.py writes (work_dirs/<config name>)',
    )
    p.add_argument('--data-root', default=osp.join('data', 'synthetic_shapes'))
    p.add_argument(
        '--threads',
        type=int,
        default=None,
        help='OMP/torch threads of each training (default: every core)',
    )
    args = p.parse_args(argv)
    for key in ('clean_iters', 'at_iters'):
        value = getattr(args, key)
        if value is not None and value < 2:
            # the warm-up and the decay need one iteration each
            p.error(f'--{key.replace("_", "-")} must be >= 2, got {value}')
    return args


def config_iters(config: str) -> int:
    """``train_cfg.max_iters`` of a synthetic config (read without building)."""
    from mmengine.config import Config

    return int(Config.fromfile(osp.join(REPO, CONFIG_DIR, config)).train_cfg.max_iters)


class Training:
    """One training of the benchmark: a config, its iterations, its work dir."""

    def __init__(self, config: str, iters, train_root: str) -> None:
        self.config = config
        self.default = config_iters(config)
        self.iters = self.default if iters is None else int(iters)
        stem = osp.splitext(config)[0]
        if self.iters == self.default:
            # where `tools/train.py CONFIG` writes: the PIR-AT configs'
            # load_from expects the clean model there
            self.work_dir = osp.join(train_root, stem)
        else:
            self.work_dir = osp.join(train_root, 'frontier', f'{stem}-{self.iters}it')

    @property
    def checkpoint(self) -> str:
        return osp.join(self.work_dir, f'iter_{self.iters}.pth')

    def command(self, data_root: str, load_from=None) -> list:
        opts = ['default_hooks.logger.interval=10']
        warmup = min(50, self.iters // 2)
        if self.iters != self.default:
            opts += [
                f'train_cfg.max_iters={self.iters}',
                f'train_cfg.val_interval={self.iters}',
                # the configs' warm-up (50 iterations), within short runs
                f'param_scheduler.0.end={warmup}',
                f'param_scheduler.1.begin={warmup}',
                f'param_scheduler.1.end={self.iters}',
                f'default_hooks.checkpoint.interval={max(self.iters // 4, 1)}',
            ]
        # resume from an interrupted run's last checkpoint; otherwise start (the
        # PIR-AT model from the clean one). mmengine's --resume with load_from
        # set would resume *from* load_from.
        resume = osp.isfile(osp.join(self.work_dir, 'last_checkpoint'))
        if resume:
            opts.append('load_from=None')
        elif load_from is not None:
            opts.append(f'load_from={load_from}')
        opts += [
            f'{loader}.dataset.data_root={data_root}'
            for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
        ]
        cmd = [sys.executable, osp.join(REPO, 'tools', 'train.py')]
        cmd += [osp.join(REPO, CONFIG_DIR, self.config), '--work-dir', self.work_dir]
        if resume:
            cmd.append('--resume')
        return cmd + ['--cfg-options'] + opts


def run(training: Training, data_root: str, threads, load_from=None) -> None:
    if osp.isfile(training.checkpoint):
        print(f'{training.config}: already trained: {training.checkpoint}', flush=True)
        return
    os.makedirs(training.work_dir, exist_ok=True)
    log = osp.join(training.work_dir, 'train.log')
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = training.command(data_root, load_from)
    print(
        f'{training.config}: training {training.iters} iterations, log {log}',
        flush=True,
    )
    t0 = time.time()
    with open(log, 'a') as f:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT
        )
    if proc.returncode != 0 or not osp.isfile(training.checkpoint):
        with open(log, errors='replace') as f:
            tail = ''.join(f.readlines()[-30:])
        raise SystemExit(
            f'{training.config}: training failed (exit {proc.returncode}), log '
            f'{log}; rerun the same command to resume.\n{tail}'
        )
    print(f'{training.config}: done in {time.time() - t0:.0f} s', flush=True)


def main(argv=None):
    args = parse_args(argv)
    from mmseg_robust.datasets import generate_synthetic_dataset

    train_root = osp.abspath(args.train_root)
    data_root = osp.abspath(args.data_root)
    # generated on first use; a stale folder is refused with a message
    generate_synthetic_dataset(data_root)
    manifest_path = osp.join(train_root, 'frontier', 'models.json')
    manifest = {}
    if osp.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    for arch in args.archs:
        clean_cfg, at_cfg, (clean_name, at_name) = ARCHS[arch]
        clean = Training(clean_cfg, args.clean_iters, train_root)
        at = Training(at_cfg, args.at_iters, train_root)
        run(clean, data_root, args.threads)
        run(at, data_root, args.threads, load_from=clean.checkpoint)
        for name, t in ((clean_name, clean), (at_name, at)):
            manifest[name] = dict(
                config=osp.join(CONFIG_DIR, t.config),
                checkpoint=t.checkpoint,
                iters=t.iters,
            )
    os.makedirs(osp.dirname(manifest_path), exist_ok=True)
    with open(manifest_path, 'w') as f:
        json.dump(manifest, f, indent=1)
    for name, entry in manifest.items():
        print(f'{name}: {entry["checkpoint"]}')
    print(f'models: {manifest_path} (benchmarks/frontier.py --models-json)')
    return manifest


if __name__ == '__main__':
    main()
