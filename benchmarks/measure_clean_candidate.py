"""Measurement: how often, and by how much, counting the clean image as a
worst-case candidate (``RobustnessMetric(clean_candidate=True)``,
docs/algorithms.md section 4) changes SEA's worst-case numbers.

    python benchmarks/measure_clean_candidate.py [--steps 5,30,100] [--eps 0.25,1,4]
        [--scales 0.1,0.3,0.8] [--batch 32] [--size 16] [--noise 0.05]
        [--out benchmarks/results/measure_clean_candidate.json]

Models (fixed seeds, nothing downloaded): the 2-layer conv nets of the attack
tests (``attack_models.tiny_net`` in tests/conftest.py), 4 classes, at weight
scales ``--scales`` (smaller: smoother, more robust), on random images with
labels = the clean prediction except on the ``--noise`` share of the pixels
(5%) with the smallest margin between the two top classes, labelled with the
runner-up class (a random start in the ball can make them correct). For each
scale, eps and number of steps, SEA (three APGDLargeEps members) attacks one
batch; from the per-image counts it reports the images on which some member ends
above the clean pixel accuracy, those on which the worst case over the members
does (only there can the clean image change a number), and the worst-case aACC
and 'best' mIoU without and with the clean candidate (percent).
"""

import argparse
import json
import os
import os.path as osp
import platform
import sys
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmseg_robust.attacks import SEA  # noqa: E402
from mmseg_robust.evaluation import (  # noqa: E402
    counts_of_batch,
    image_record,
    summarize_records,
)
from mmseg_robust.evaluation.self_checks import above_clean_counts  # noqa: E402

K = 4
WEIGHTS = [0.25] * K


def tiny_net(scale, seed=0):
    """tests/conftest.py's ``attack_models.tiny_net``."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv2d(16, K, 3, padding=1),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.eval().requires_grad_(False)


def data(net, b, size, noise, seed=1):
    """Random images; labels = the clean prediction, except on the ``noise``
    share of the pixels with the smallest margin between the two top classes,
    labelled with the runner-up class (near the decision boundary: a random
    start can make them correct)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, size, size, generator=g)
    logits = net(images)
    top2 = logits.topk(2, dim=1)
    labels = top2.indices[:, 0]
    margin = (top2.values[:, 0] - top2.values[:, 1]).flatten(1)
    k = int(noise * margin.shape[1])
    if k:
        low = margin.argsort(1)[:, :k]
        flat = labels.flatten(1).clone()
        flat.scatter_(1, low, top2.indices[:, 1].flatten(1).gather(1, low))
        labels = flat.view_as(labels)
    return images, labels


def measure(net, images, labels, eps, steps):
    sea = SEA(eps=eps, steps=steps, class_weights=WEIGHTS, eps_units='255')
    out = sea.run(net, images, labels, seeds=list(range(len(images))))
    clean = counts_of_batch(net(images).argmax(1), labels, K, 255)
    members = {
        n: counts_of_batch(o.adv_pred, labels, K, 255) for n, o in out.members.items()
    }
    key = f'{eps:g}'
    records = [
        image_record(
            f'img{i}', K, clean[i], {key: {n: c[i] for n, c in members.items()}}
        )
        for i in range(len(images))
    ]
    above = above_clean_counts(records)[key]
    plain = summarize_records(records, ['best'])['eps'][key]['worst_case']
    with_clean = summarize_records(records, ['best'], clean_candidate=True)
    with_clean = with_clean['eps'][key]['worst_case']
    return dict(
        images=above['images'],
        member_above_clean=sum(1 for r in records if _any_above(r, key)),
        member_counts=above['attacks'],
        worst_case_above_clean=above['worst_case'],
        aAcc=plain['aAcc_img'],
        aAcc_clean_candidate=with_clean['aAcc_img'],
        mIoU_best=plain['mIoU_best'],
        mIoU_best_clean_candidate=with_clean['mIoU_best'],
        clean_aAcc=summarize_records(records, ['best'])['clean']['aAcc_img'],
    )


def _any_above(record, key):
    clean = record['clean']['correct'] / max(record['clean']['valid'], 1)
    return any(
        c['correct'] / max(c['valid'], 1) > clean
        for c in record['attacks'][key].values()
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', default='5,30,100')
    parser.add_argument('--eps', default='0.25,1,4')
    parser.add_argument('--scales', default='0.1,0.3,0.8')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--size', type=int, default=16)
    parser.add_argument('--noise', type=float, default=0.05)
    parser.add_argument(
        '--out',
        default=osp.join(ROOT, 'benchmarks', 'results', 'measure_clean_candidate.json'),
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    t0 = time.time()
    for scale in [float(s) for s in args.scales.split(',')]:
        net = tiny_net(scale)
        images, labels = data(net, args.batch, args.size, args.noise)
        for eps in [float(e) for e in args.eps.split(',')]:
            for steps in [int(s) for s in args.steps.split(',')]:
                row = dict(scale=scale, eps=eps, steps=steps)
                row.update(measure(net, images, labels, eps, steps))
                rows.append(row)
                print(
                    f'scale {scale:g} eps {eps:g} steps {steps:3d}: clean aAcc '
                    f'{row["clean_aAcc"]:.2f}; some member above clean on '
                    f'{row["member_above_clean"]}/{row["images"]} images, worst '
                    f'case on {row["worst_case_above_clean"]}; aAcc '
                    f'{row["aAcc"]:.3f} -> {row["aAcc_clean_candidate"]:.3f}, '
                    f'mIoU(best) {row["mIoU_best"]:.3f} -> '
                    f'{row["mIoU_best_clean_candidate"]:.3f}',
                    flush=True,
                )
    result = dict(
        settings=vars(args),
        machine=f'{platform.machine()} CPU, torch {torch.__version__}',
        wall_s=round(time.time() - t0, 1),
        rows=rows,
    )
    os.makedirs(osp.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'written to {args.out}')


if __name__ == '__main__':
    main()
