"""Benchmark: full SEA against SEA with ``stall_stop=True`` on the same images
(docs/algorithms.md section 3.2, ``stall_stop``).

    python benchmarks/bench_fast_sea.py --ckpt clean=PATH --ckpt PIR-AT=PATH
        [--model DDC-AT CONFIG PATH] [--images 16] [--eps 4,8] [--steps 100]
        [--no-tiny] [--out benchmarks/results/bench_fast_sea.json]

Models:

* ``--ckpt NAME=PATH`` (repeatable): a checkpoint of the synthetic demo's small
  UperNet-ConvNeXt (``--config``, default
  configs/synthetic/upernet_convnext-micro_synthetic.py), or ``--model NAME CONFIG
  PATH`` with its own config (the DDC-AT model), checked to fit its model
  exactly (``check_checkpoint_fits``), evaluated on the first
  ``--images`` validation images of the synthetic dataset (``--data-root``),
  through the test loop's pixel view (``SegmentorPixelView``) in batches of 8, with
  the Mask-CE-Bal weights of the training set (``dataset_class_weights``);
* ``tiny-*`` (unless ``--no-tiny``): the 2-layer conv nets of the attack tests
  (``attack_models.tiny_net`` in tests/conftest.py) on random images, labels = the
  clean prediction with 20% of the pixels relabelled at random.

Each batch is attacked by both modes, in alternating order (so slow drifts of a
shared machine hit both alike); per image seed = its index. Per model and eps it
reports the wall time of both modes, the speed-up, the images forwarded by the
model (a machine-independent cost), the worst-case mIoU (``worst_case_miou``, mode
``'best'``, over the per-member per-image counts of ``counts_of_batch``) and the
worst-case aACC (mean over images of the per-image minimum accuracy), and the
differences fast - full in percent points (positive: the fast mode is weaker).
"""

import argparse
import json
import os.path as osp
import platform
import sys
import time

import numpy as np
import torch
from compare_apgd_modes import tiny_net  # the attack tests' 2-layer net

from mmseg_robust.attacks import SEA
from mmseg_robust.evaluation.counts import pixel_accuracy
from mmseg_robust.evaluation.robustness_metric import counts_of_batch
from mmseg_robust.evaluation.worst_case import worst_case_aacc, worst_case_miou

CONFIG = 'configs/synthetic/upernet_convnext-micro_synthetic.py'
TINY_SETTINGS = [  # (weight scale, image size, eps, batch)
    (0.8, 8, 8, 16),
    (1.5, 8, 32, 16),
    (0.8, 16, 16, 16),
]
MODES = {'full': {}, 'fast': dict(stall_stop=True)}


class Counter:
    """Counts the images forwarded by ``module`` (a forward pre-hook)."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.n += int(args[0].shape[0])


def tiny_batches(net, b, size, seed=0, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g)
    relabel = torch.rand(b, size, size, generator=g) < noise
    random = torch.randint(0, 4, (b, size, size), generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
    return [(net, x, torch.where(relabel, random, y), list(range(b)))]


def upernet(config, ckpt, data_root, n_images):
    """The model, its class count, the batches ``(view, x, y, seeds)`` and the
    Mask-CE-Bal weights of the training set."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner, load_checkpoint

    import mmseg_robust  # noqa: F401
    from mmseg_robust.engine.presets import dataset_class_weights
    from mmseg_robust.models.checkpoint import check_checkpoint_fits
    from mmseg_robust.models.pixel_space import SegmentorPixelView
    from mmseg_robust.registry import MODELS

    init_default_scope('mmseg')
    cfg = Config.fromfile(config)
    model = MODELS.build(cfg.model)
    check_checkpoint_fits(ckpt, model)  # every tensor, or a clear error
    load_checkpoint(model, ckpt, map_location='cpu', logger='silent')
    model.eval().requires_grad_(False)
    k = cfg.model.decode_head.num_classes
    loader = dict(cfg.test_dataloader)
    loader.update(num_workers=0, persistent_workers=False, batch_size=8)
    loader['dataset'] = dict(loader['dataset'], data_root=data_root)
    loader['dataset']['indices'] = n_images
    batches = []
    for data in Runner.build_dataloader(loader):
        view = SegmentorPixelView(model, data)
        start = len(batches) and sum(len(b[1]) for b in batches)
        seeds = list(range(start, start + len(view.images)))
        batches.append((view, view.images, view.labels, seeds))
    train = dict(cfg.train_dataloader.dataset, data_root=data_root)
    weights = dataset_class_weights(train, k)
    return model, k, batches, weights


def run_model(counted, k, batches, eps, steps, weights):
    counter = Counter(counted)
    res = {m: dict(wall_s=0.0, forwarded=0, records=[]) for m in MODES}
    for b, (view, x, y, seeds) in enumerate(batches):
        order = list(MODES) if b % 2 == 0 else list(MODES)[::-1]
        for mode in order:
            sea = SEA(eps=eps, steps=steps, class_weights=weights, **MODES[mode])
            before = counter.n
            t = time.perf_counter()
            out = sea.run(view, x, y, seeds=seeds)
            res[mode]['wall_s'] += time.perf_counter() - t
            res[mode]['forwarded'] += counter.n - before
            members = [
                counts_of_batch(o.adv_pred, y, k, 255) for o in out.members.values()
            ]
            res[mode]['records'].extend(zip(*members))  # per image: per member
    summary = {}
    for mode, r in res.items():
        recs = r.pop('records')  # [image][member] -> counts
        inter = np.array([[m['intersect'] for m in img] for img in recs])
        union = np.array([[m['union'] for m in img] for img in recs])
        correct = np.array([[m['correct'] for m in img] for img in recs])
        valid = np.array([[m['valid'] for m in img] for img in recs])
        miou, _ = worst_case_miou(inter.transpose(1, 0, 2), union.transpose(1, 0, 2))
        acc = pixel_accuracy(torch.as_tensor(correct.T), torch.as_tensor(valid.T))
        summary[mode] = dict(
            wall_s=round(r['wall_s'], 2),
            forwarded=r['forwarded'],
            worst_mIoU=round(100 * miou, 3),
            worst_aACC=round(100 * worst_case_aacc(np.asarray(acc)), 3),
        )
    full, fast = summary['full'], summary['fast']
    summary['speedup'] = round(full['wall_s'] / fast['wall_s'], 3)
    summary['forward_ratio'] = round(full['forwarded'] / fast['forwarded'], 3)
    summary['delta_mIoU'] = round(fast['worst_mIoU'] - full['worst_mIoU'], 3)
    summary['delta_aACC'] = round(fast['worst_aACC'] - full['worst_aACC'], 3)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--ckpt', action='append', default=[], help='NAME=PATH')
    parser.add_argument('--config', default=CONFIG, help='the config of --ckpt')
    parser.add_argument(
        '--model',
        nargs=3,
        action='append',
        default=[],
        metavar=('NAME', 'CONFIG', 'PATH'),
        help='a checkpoint with its own config',
    )
    parser.add_argument('--data-root', default=osp.join('data', 'synthetic_shapes'))
    parser.add_argument('--images', type=int, default=16)
    parser.add_argument('--eps', default='4,8')
    parser.add_argument('--steps', type=int, default=100)
    parser.add_argument('--no-tiny', action='store_true')
    parser.add_argument('--out', default=None)
    args = parser.parse_args(argv)

    results = {}

    def report(key, r):
        results[key] = r
        f, s = r['full'], r['fast']
        print(
            f'{key:32s} full {f["wall_s"]:7.1f}s fast {s["wall_s"]:7.1f}s '
            f'x{r["speedup"]:.2f} (fwd x{r["forward_ratio"]:.2f})  mIoU '
            f'{f["worst_mIoU"]:6.2f} -> {s["worst_mIoU"]:6.2f} '
            f'({r["delta_mIoU"]:+.2f})  aACC {f["worst_aACC"]:6.2f} -> '
            f'{s["worst_aACC"]:6.2f} ({r["delta_aACC"]:+.2f})',
            flush=True,
        )

    eps_list = [float(e) for e in args.eps.split(',')]
    models = [(*spec.split('=', 1), args.config) for spec in args.ckpt]
    models += [(name, path, config) for name, config, path in args.model]
    for name, path, config in models:
        model, k, batches, weights = upernet(config, path, args.data_root, args.images)
        for eps in eps_list:
            r = run_model(model.backbone, k, batches, eps, args.steps, weights)
            report(f'{name}-eps{eps:g}', r)
    if not args.no_tiny:
        for scale, size, eps, b in TINY_SETTINGS:
            net = tiny_net(scale=scale)
            batches = tiny_batches(net, b, size)
            r = run_model(net, 4, batches, eps, args.steps, [0.25] * 4)
            report(f'tiny-s{scale:g}-{size}px-eps{eps:g}', r)

    out = dict(
        steps=args.steps,
        images=args.images,
        config=args.config,
        checkpoints={name: dict(path=path, config=cfg) for name, path, cfg in models},
        date=time.strftime('%Y-%m-%d'),
        tiny_settings=TINY_SETTINGS,
        device=f'cpu ({platform.processor() or "x86_64"}, '
        f'{torch.get_num_threads()} threads)',
        torch=torch.__version__,
        note='delta = fast - full (percent points); positive: stall_stop is weaker',
        results=results,
    )
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == '__main__':
    sys.exit(main() and 0)
