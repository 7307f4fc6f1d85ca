"""Benchmark: per-iteration cost of each SEA attack relative to one bare
forward + input-gradient pass of the same model and batch, and the bytes SEA keeps
per image.

    python benchmarks/bench_sea.py [--config CFG] [--batch 8] [--size 64]
        [--iters 30] [--repeats 5] [--device cpu|cuda] [--out results.json]

Both costs are measured in the same process, interleaved in blocks of equal
length (``--iters`` bare passes, one attack run of ``--iters`` iterations, ...), and
the ratio of their medians is reported: shared machines are noisy,
absolute times are not comparable between runs, ratios are. An attack's
per-iteration cost is its wall time divided by its number of forward+backward
iterations (early stopping off, so every image stays in the batch). Target: <= 1.05.
"""

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmseg_robust  # noqa: F401
from mmseg_robust.attacks import SEA_LOSSES, APGDLargeEps
from mmseg_robust.evaluation.robustness_metric import RECORD_COUNT_KEYS, counts_of_batch
from mmseg_robust.registry import MODELS

DEFAULT_CONFIG = 'configs/synthetic/upernet_convnext-micro_synthetic.py'


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def bare_pass(view, x, y):
    """One forward + input-gradient pass: the unit of an attack iteration."""
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(view(x), y, reduction='sum')
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def timed(fn, device):
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument(
        '--num-classes',
        type=int,
        default=None,
        help="override the decode heads' class count",
    )
    parser.add_argument(
        '--iters', type=int, default=30, help='iterations of each timed attack run'
    )
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument(
        '--device', default='cuda' if torch.cuda.is_available() else 'cpu'
    )
    parser.add_argument('--out', default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    init_default_scope('mmseg')
    cfg = Config.fromfile(args.config)
    if args.num_classes:
        cfg.model.decode_head.num_classes = args.num_classes
        if cfg.model.get('auxiliary_head'):
            cfg.model.auxiliary_head.num_classes = args.num_classes
    model = MODELS.build(cfg.model).to(device).eval().requires_grad_(False)
    num_classes = cfg.model.decode_head.num_classes
    pre = model.data_preprocessor
    mean, std = pre.mean.to(device), pre.std.to(device)

    def view(images):  # the pixel-space view of SegmentorPixelView, unpadded
        logits = model.encode_decode(
            (images * 255 - mean) / std,
            [dict(img_shape=images.shape[2:], pad_shape=images.shape[2:])]
            * images.shape[0],
        )
        return logits

    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    with torch.no_grad():
        y = view(x).argmax(1)  # labels = clean prediction: accuracy starts at 1
    seeds = list(range(args.batch))
    weights = [1.0 / num_classes] * num_classes
    # SEA's members, built as SEA builds them: one APGDLargeEps per loss
    members = {
        f'APGD-{loss}': APGDLargeEps(
            eps=8,
            steps=args.iters,
            early_stop=False,
            loss=dict(type=loss, class_weights=weights)
            if loss == 'Mask-CE-Bal'
            else loss,
        )
        for loss in SEA_LOSSES
    }

    for _ in range(2):  # warm-up
        bare_pass(view, x, y)
    results = {}
    for name, attack in members.items():
        attack.run(view, x, y, seeds=seeds)  # warm-up
        bare_times, attack_times = [], []
        for _ in range(args.repeats):
            # as many bare passes as attack iterations: both blocks last about
            # as long, so slow drifts of the machine's speed hit both alike
            bare_times.append(
                timed(
                    lambda: [bare_pass(view, x, y) for _ in range(args.iters)], device
                )
                / args.iters
            )
            attack_times.append(
                timed(lambda: attack.run(view, x, y, seeds=seeds), device) / args.iters
            )
        bare, per_iter = statistics.median(bare_times), statistics.median(attack_times)
        results[name] = dict(bare_s=bare, per_iter_s=per_iter, ratio=per_iter / bare)
        print(
            f'{name:20s} bare {bare * 1e3:8.2f} ms  per iteration '
            f'{per_iter * 1e3:8.2f} ms  ratio {per_iter / bare:.3f}'
        )

    # Bytes SEA keeps per image: per attack and eps, int64 intersect/union/label
    # area per class + correct/valid counts; never a prediction map.
    with torch.no_grad():
        pred = view(x).argmax(1)
    rec = counts_of_batch(pred, y, num_classes, 255)[0]
    per_attack = 8 * (len(RECORD_COUNT_KEYS) * num_classes + 2)
    json_bytes = len(json.dumps(rec, separators=(',', ':')))
    memory = dict(
        num_classes=num_classes,
        bytes_per_image_per_attack_int64=per_attack,
        bytes_per_image_sea_int64=3 * per_attack,
        json_bytes_per_image_per_attack=json_bytes,
        reference_bytes_per_image_per_attack_512x512=512 * 512 * 8,
    )
    print(json.dumps(memory, indent=1))
    out = dict(
        config=args.config,
        batch=args.batch,
        size=args.size,
        iters=args.iters,
        repeats=args.repeats,
        device=torch.cuda.get_device_name(device)
        if device.type == 'cuda'
        else f'cpu ({platform.processor() or "x86_64"}, '
        f'{torch.get_num_threads()} threads)',
        torch=torch.__version__,
        attacks=results,
        memory=memory,
    )
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == '__main__':
    sys.exit(main() and 0)
