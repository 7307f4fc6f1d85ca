"""Benchmark: one adversarial training step with k attack steps divided by one
clean training step of the same model and batch (the limit is k + 1).

    python benchmarks/bench_adversarial_training.py [--config CFG] [--steps 1 2 5]
        [--batch 8] [--repeats 5] [--model-config CFG --size 512] [--amp]
        [--out results.json]

The clean step is the model's stock ``train_step``; the adversarial step is what
:class:`~mmseg_robust.engine.AdversarialTrainLoop` does per iteration
(``adversarial_batch`` with a k-step PGD, then ``train_step``). Both are timed in
the same process, interleaved, and the ratio of their medians is reported.
``--model-config`` times another config's model (e.g. UperNet-ConvNeXt-T) on the
synthetic batches, padded by the data preprocessor to ``--size``. ``--amp`` times
both steps with mmengine's ``AmpOptimWrapper`` (as ``tools/train.py --amp``; CUDA
only).
"""

import argparse
import json
import os.path as osp
import platform
import statistics
import sys
import tempfile
import time

import torch
from mmengine.config import Config
from mmengine.runner import Runner

import mmseg_robust  # noqa: F401
from mmseg_robust.registry import ATTACKS

DEFAULT_CONFIG = 'configs/synthetic/upernet_convnext-micro_pirat_synthetic.py'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--steps', type=int, nargs='+', default=[1, 2, 5])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--data-root', default=None)
    parser.add_argument(
        '--model-config', default=None, help='time the model of this config instead'
    )
    parser.add_argument(
        '--size', type=int, default=None, help='pad the inputs to size x size'
    )
    parser.add_argument(
        '--amp', action='store_true', help='mixed precision (AmpOptimWrapper, CUDA)'
    )
    parser.add_argument('--out', default=None)
    args = parser.parse_args(argv)

    cfg = Config.fromfile(args.config)
    if args.model_config:
        model = Config.fromfile(args.model_config).model
        num_classes = cfg.model.decode_head.num_classes
        for head in ('decode_head', 'auxiliary_head'):
            if model.get(head):
                model[head].num_classes = num_classes
        model.backbone.pop('init_cfg', None)  # weights do not change the time
        cfg.model = model
    if args.size:
        cfg.model.data_preprocessor.size = (args.size, args.size)
    if args.amp:  # as tools/train.py --amp
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    cfg.load_from = None  # weights do not change the time (PIR-AT configs name one)
    cfg.work_dir = tempfile.mkdtemp(prefix='bench_at_')
    cfg.train_dataloader.batch_size = args.batch
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    if args.data_root:
        cfg.train_dataloader.dataset.data_root = args.data_root
    cfg.log_level = 'WARNING'
    runner = Runner.from_cfg(cfg)
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    loop = runner.train_loop
    model, optim = runner.model, runner.optim_wrapper
    batch = next(iter(runner.train_dataloader))
    device = next(model.parameters()).device

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    def clean_step():
        model.train()
        model.train_step(batch, optim_wrapper=optim)

    def adv_step():
        model.train()
        adv, _ = loop.adversarial_batch(batch)
        model.train_step(adv, optim_wrapper=optim)

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    results = {}
    for k in args.steps:
        # as the loop builds its attack: no forward at the returned images
        loop.attack = ATTACKS.build(
            dict(
                type='PGD',
                eps=4,
                steps=k,
                step_size=2.55,
                random_start=False,
                predict_output=False,
            )
        )
        clean_step()
        adv_step()  # warm-up
        clean, adv = [], []
        for _ in range(args.repeats):
            clean.append(timed(clean_step))
            adv.append(timed(adv_step))
        c, a = statistics.median(clean), statistics.median(adv)
        results[k] = dict(clean_s=c, adversarial_s=a, ratio=a / c, limit=k + 1)
        print(
            f'k={k}: clean step {c * 1e3:8.1f} ms  adversarial step '
            f'{a * 1e3:8.1f} ms  ratio {a / c:.2f} (limit {k + 1})'
        )
    out = dict(
        config=osp.basename(args.config),
        model_config=args.model_config and osp.basename(args.model_config),
        size=args.size,
        batch=args.batch,
        repeats=args.repeats,
        amp=args.amp,
        device=torch.cuda.get_device_name(device)
        if device.type == 'cuda'
        else f'cpu ({platform.processor() or "x86_64"}, {torch.get_num_threads()} '
        'threads)',
        torch=torch.__version__,
        steps=results,
    )
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == '__main__':
    sys.exit(main() and 0)
