"""Benchmark: SEA with the APGD options zero_acc and first_window in each mode
(docs/algorithms.md section 3.2: ``zero_acc`` and ``first_window``).

    python benchmarks/compare_apgd_modes.py [--steps 60] [--batch 16]
        [--modes leave_paper,zero_acc,first_window,reference] [--no-upernet]
        [--upernet-eps 8,32] [--upernet-size 32] [--data-seeds 0,1]
        [--out benchmarks/results/compare_apgd_modes.json]

Models (fixed seeds, nothing downloaded):

* ``tiny-*``: the 2-layer conv nets of the attack tests (``attack_models.tiny_net``
  in tests/conftest.py), 4 classes, on random images with labels = the clean
  prediction with a share (``noise``) of the pixels relabelled at random; the
  settings (``TINY_SETTINGS``) range from no image reaching accuracy 0 to most
  images reaching it (small images, large eps), where ``zero_acc`` matters;
* ``upernet-micro``: the synthetic demo model
  (configs/synthetic/upernet_convnext-micro_synthetic.py) with its random
  initial weights, labels = its clean prediction, at ``--upernet-eps`` (at 8 no
  image reaches accuracy 0, at 32 most do); ``--no-upernet`` skips it.

For each model and mode it runs SEA (three APGDLargeEps members) on one batch and
reports the worst-case aACC (mean over images of the per-image minimum over the
members, ``evaluation.worst_case.worst_case_aacc``), the worst-case mIoU
(``worst_case_miou``, mode ``'best'``), every member's pooled mIoU, the wall time,
and against the first mode the share of images whose SEA prediction differs and
the share of (member, image) pairs whose prediction differs. Modes:
``leave_paper`` (``zero_acc='leave', first_window='paper'``, the defaults before
the measurement), ``zero_acc`` (only ``zero_acc='reference'``), ``first_window``
(only ``first_window='reference'``), ``reference`` (``compat='reference'``, the
defaults now, with the reference's early stop).
"""

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch

from mmseg_robust.attacks import SEA
from mmseg_robust.evaluation.counts import (
    per_image_counts,
    pixel_accuracy,
    pooled_metrics,
)
from mmseg_robust.evaluation.worst_case import worst_case_aacc, worst_case_miou

UPERNET_CONFIG = 'configs/synthetic/upernet_convnext-micro_synthetic.py'
TINY_SETTINGS = [  # (weight scale, image size, eps, label noise)
    (0.8, 8, 8, 0.2),
    (1.5, 8, 32, 0.2),
    (0.8, 2, 64, 0.0),
    (0.8, 2, 128, 0.0),
    (0.8, 4, 128, 0.0),
]
UPERNET_NOISE = 0.0
MODES = {
    'leave_paper': dict(zero_acc='leave', first_window='paper'),
    'zero_acc': dict(zero_acc='reference', first_window='paper'),
    'first_window': dict(zero_acc='leave', first_window='reference'),
    'reference': dict(compat='reference'),
}


def tiny_net(num_classes=4, seed=0, scale=0.8):
    """tests/conftest.py's ``attack_models.tiny_net``."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv2d(16, num_classes, 3, padding=1),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.eval().requires_grad_(False)


def upernet_micro(device):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import mmseg_robust  # noqa: F401
    from mmseg_robust.registry import MODELS

    init_default_scope('mmseg')
    cfg = Config.fromfile(UPERNET_CONFIG)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).to(device).eval().requires_grad_(False)
    pre = model.data_preprocessor
    mean, std = pre.mean.to(device), pre.std.to(device)

    def view(images):
        return model.encode_decode(
            (images * 255 - mean) / std,
            [dict(img_shape=images.shape[2:], pad_shape=images.shape[2:])]
            * images.shape[0],
        )

    return view, cfg.model.decode_head.num_classes


def make_batch(view, b, size, num_classes, seed, device, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g)
    noise = torch.rand(b, size, size, generator=g) < noise
    random = torch.randint(0, num_classes, (b, size, size), generator=g)
    x = x.to(device)
    with torch.no_grad():
        y = view(x).argmax(1).cpu()
    return x, torch.where(noise, random, y).to(device)


def evaluate(view, x, y, num_classes, steps, eps, mode_kw, seeds):
    sea = SEA(
        eps=eps,
        steps=steps,
        class_weights=[1.0 / num_classes] * num_classes,
        **mode_kw,
    )
    t = time.perf_counter()
    out = sea.run(view, x, y, seeds=seeds)
    if x.is_cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    counts = {
        name: per_image_counts(o.adv_pred.cpu(), y.cpu(), num_classes)
        for name, o in out.members.items()
    }
    inter = np.stack([c['intersect'].numpy() for c in counts.values()])
    union = np.stack([c['union'].numpy() for c in counts.values()])
    acc = np.stack([pixel_accuracy(c['correct'], c['valid']) for c in counts.values()])
    miou, _ = worst_case_miou(inter, union, mode='best')
    return out, dict(
        wall_s=round(wall, 3),
        worst_aACC=100 * worst_case_aacc(acc),
        worst_mIoU=100 * miou,
        images_at_acc0=int((acc.min(0) == 0).sum()),
        members_mIoU={
            name: 100 * pooled_metrics([c])['mIoU'] for name, c in counts.items()
        },
    )


def compare(base, other):
    """Shares of images / (member, image) pairs whose prediction differs."""
    differ = (base.adv_pred != other.adv_pred).flatten(1).any(1)
    pairs = [
        (base.members[k].adv_pred != other.members[k].adv_pred).flatten(1).any(1)
        for k in base.members
    ]
    pairs = torch.stack(pairs)
    return dict(
        images_differ=float(differ.float().mean()),
        member_pairs_differ=float(pairs.float().mean()),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=60)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--upernet-eps', default='8,32')
    parser.add_argument('--modes', default=','.join(MODES))
    parser.add_argument('--no-upernet', action='store_true')
    parser.add_argument('--upernet-size', type=int, default=32)
    parser.add_argument('--data-seeds', default='0,1')
    parser.add_argument(
        '--device', default='cuda' if torch.cuda.is_available() else 'cpu'
    )
    parser.add_argument('--out', default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    modes = args.modes.split(',')
    base = modes[0]  # the mode the others are compared with

    # (view, num_classes, image size, eps): the tiny nets at radii from "few
    # images reach accuracy 0" to "most do", where zero_acc matters
    models = {}
    for scale, size, eps, noise in TINY_SETTINGS:
        for net_seed in (0, 1):
            net = tiny_net(seed=net_seed, scale=scale).to(device)
            key = f'tiny-s{scale:g}-{size}px-eps{eps:g}-noise{noise:g}-net{net_seed}'
            models[key] = (net, 4, size, eps, noise)
    if not args.no_upernet:
        view, k = upernet_micro(device)
        for eps in (float(e) for e in args.upernet_eps.split(',')):
            key = f'upernet-micro-random-{args.upernet_size}px-eps{eps:g}'
            models[key] = (view, k, args.upernet_size, eps, UPERNET_NOISE)

    results = {}
    for name, (view, k, size, eps, noise) in models.items():
        for data_seed in (int(s) for s in args.data_seeds.split(',')):
            x, y = make_batch(view, args.batch, size, k, data_seed, device, noise)
            seeds = [1000 * data_seed + i for i in range(args.batch)]
            key = f'{name}/data{data_seed}'
            outs, res = {}, {}
            for mode in modes:
                outs[mode], res[mode] = evaluate(
                    view, x, y, k, args.steps, eps, MODES[mode], seeds
                )
                if mode != base:
                    res[mode].update(compare(outs[base], outs[mode]))
            results[key] = res
            line = '  '.join(
                f'{m}: aACC {r["worst_aACC"]:6.2f} mIoU {r["worst_mIoU"]:6.2f} '
                f'{r["wall_s"]:6.1f}s acc0 {r["images_at_acc0"]}'
                + (f' diff {r["images_differ"]:.2f}' if 'images_differ' in r else '')
                for m, r in res.items()
            )
            print(f'{key:34s} {line}', flush=True)

    summary = {}
    for mode in modes[1:]:
        runs = list(results.values())
        d_acc = [r[mode]['worst_aACC'] - r[base]['worst_aACC'] for r in runs]
        d_miou = [
            r[mode]['worst_mIoU'] - r[base]['worst_mIoU'] for r in results.values()
        ]
        summary[mode] = dict(
            runs=len(d_acc),
            base_higher_aACC=sum(d < 0 for d in d_acc),
            base_lower_aACC=sum(d > 0 for d in d_acc),
            base_higher_mIoU=sum(d < 0 for d in d_miou),
            base_lower_mIoU=sum(d > 0 for d in d_miou),
            mean_delta_aACC=float(np.mean(d_acc)),
            mean_delta_mIoU=float(np.mean(d_miou)),
            max_base_excess_mIoU=float(max(0.0, -min(d_miou))),
            mean_images_differ=float(
                np.mean([r[mode]['images_differ'] for r in results.values()])
            ),
            time_ratio=float(
                sum(r[mode]['wall_s'] for r in results.values())
                / sum(r[base]['wall_s'] for r in results.values())
            ),
        )
    print(json.dumps(summary, indent=1))
    out = dict(
        steps=args.steps,
        batch=args.batch,
        tiny_settings=TINY_SETTINGS,
        upernet_eps=args.upernet_eps,
        upernet_label_noise=UPERNET_NOISE,
        device=torch.cuda.get_device_name(device)
        if device.type == 'cuda'
        else f'cpu ({platform.processor() or "x86_64"}, '
        f'{torch.get_num_threads()} threads)',
        torch=torch.__version__,
        note=f'delta = mode - {base} (percent points); a negative delta means '
        f'the mode found a stronger (lower) worst case than {base}',
        summary=summary,
        results=results,
    )
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == '__main__':
    sys.exit(main() and 0)
