"""Cheaper passes (``evaluator.speedups``, docs/algorithms.md section 1): the
time of one forward+input-gradient pass and the change in attack strength of
each option, against plain fp32 passes measured in the same run.

    python benchmarks/cheaper_passes.py [--config CFG] [--checkpoint CKPT]
        [--data-root DIR] [--device cpu|cuda] [--options NAME[+NAME] ...]
        [--batch 8] [--repeats 20] [--images 8] [--steps 50] [--eps 8]
        [--threads N] [--size S --no-strength] --out JSON

Per option set (``channels_last``, ``compile``, ``bf16``, or a combination
such as ``channels_last+compile``):

- speed: the median over ``--repeats`` of one forward, the cross-entropy and
  its input gradient through the pixel-space view on a batch of ``--batch``
  test images, and its ratio to the plain pass. The repeats of all options
  are interleaved (plain, option 1, option 2, ..., plain, ...), so a machine's
  changing load affects all alike. The first pass of each option (warm-up;
  with ``compile``, the compilation, inductor's on-disk caches off unless
  ``--warm-compile-cache``) is timed on its own.
- strength: the same reduced SEA (``--steps`` iterations per member, the seed
  fixed) on the first ``--images`` test images at ``--eps``, with and without
  the option: worst-case mIoU and aACC (per-image, %) and their differences
  (the bar is 0.1 point).

Defaults: the demo's PIR-AT UperNet-ConvNeXt-micro (its config and
``work_dirs/upernet_convnext-micro_pirat_synthetic/iter_300.pth``) on the
synthetic test images; CPU: ``channels_last``, ``compile`` and both; CUDA: also
``bf16`` and all three. The compilation uses ``torch.compile``'s defaults
(inductor). ``--size S --no-strength`` times the config's model with random
weights on random ``S x S`` images instead (a paper-size model, e.g. the PIR-AT
UperNet-ConvNeXt-T at 512; no data or checkpoint needed). Writes one JSON
(``--out``).
"""

import argparse
import copy
import datetime
import json
import os.path as osp
import platform
import statistics
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, osp.join(REPO, 'benchmarks'))

DEFAULT_CONFIG = 'configs/synthetic/upernet_convnext-micro_pirat_synthetic.py'
DEFAULT_CHECKPOINT = 'work_dirs/upernet_convnext-micro_pirat_synthetic/iter_300.pth'
CPU_OPTIONS = ('channels_last', 'compile', 'channels_last+compile')
GPU_OPTIONS = CPU_OPTIONS + ('bf16', 'channels_last+compile+bf16')


def _sync(device) -> None:
    import torch

    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def pass_seconds(view, images, device) -> float:
    """Seconds of one forward + CE + input gradient through ``view``."""
    import torch

    _sync(device)
    t0 = time.perf_counter()
    x = images.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(view(x), view.labels, ignore_index=255)
    (grad,) = torch.autograd.grad(loss, x)
    _sync(device)
    return time.perf_counter() - t0


def random_model_and_batch(config, batch_size, size, device):
    """A config's model with random weights (seed 0, no pretrained
    initialisation) and a batch of random images ``size x size`` with random
    labels, as a test dataloader gives them."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    import mmseg_robust  # noqa: F401 (registers the models)
    from mmseg_robust.models import ignore_index_of
    from mmseg_robust.registry import MODELS

    init_default_scope('mmseg')
    cfg = Config.fromfile(config if osp.isabs(config) else osp.join(REPO, config))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval().to(device)
    head = cfg.model.decode_head
    num_classes = int((head[-1] if isinstance(head, list) else head).num_classes)
    g = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for i in range(batch_size):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g).byte())
        sample = SegDataSample(
            metainfo=dict(img_path=f'random_{i}.png', ori_shape=(size, size))
        )
        sample.set_metainfo(dict(img_shape=(size, size)))
        labels = torch.randint(0, num_classes, (1, size, size), generator=g)
        sample.gt_sem_seg = PixelData(data=labels)
        samples.append(sample)
    return model, dict(inputs=inputs, data_samples=samples), ignore_index_of(model)


def time_passes(model, batch, option_sets, repeats, device) -> dict:
    """Warm-up and median pass seconds of plain and each option set, the
    repeats interleaved."""
    from mmseg_robust.models import CheaperPasses, SegmentorPixelView

    names = ['plain'] + list(option_sets)
    passes = {n: CheaperPasses(None if n == 'plain' else n.split('+')) for n in names}
    views, first, times = {}, {}, {n: [] for n in names}
    for name in names:
        with passes[name].applied(model):
            views[name] = SegmentorPixelView(model, copy.deepcopy(batch), passes[name])
            first[name] = pass_seconds(views[name], views[name].images, device)
            print(f'{name}: first pass {first[name]:.2f} s', flush=True)
    for _ in range(repeats):
        for name in names:
            with passes[name].applied(model):
                view = views[name]
                times[name].append(pass_seconds(view, view.images, device))
    plain = statistics.median(times['plain'])
    out = {}
    for name in names:
        med = statistics.median(times[name])
        out[name] = dict(
            first_s=round(first[name], 4),
            median_s=round(med, 5),
            ratio_to_plain=round(med / plain, 3),
            all_s=[round(t, 5) for t in times[name]],
        )
        print(
            f'{name}: median {1e3 * med:.1f} ms, {med / plain:.3f} x plain', flush=True
        )
    return out


def sea_strength(model, loader, ignore, attack_cfg, eps, seed, speedups) -> dict:
    """Worst-case mIoU/aACC (%) of one reduced SEA run, and its seconds."""
    from mmseg_robust.evaluation import RobustnessEvaluator, summarize_records
    from mmseg_robust.evaluation.counts import eps_key
    from mmseg_robust.models import CheaperPasses, SegmentorPixelView

    passes = CheaperPasses(speedups)
    evaluator = RobustnessEvaluator(
        [attack_cfg], eps=[eps], seed=seed, ignore_index=ignore, self_checks=False
    )
    records = []
    t0 = time.perf_counter()
    for batch in loader:
        keys = [s.img_path for s in batch['data_samples']]
        with passes.applied(model):
            view = SegmentorPixelView(model, batch, passes=passes)
            result = evaluator.evaluate(view, keys)
        records += [r.to_json() for r in result.records]
    seconds = time.perf_counter() - t0
    summary = summarize_records(records, worst_case_modes=('best',))
    at = summary['eps'][eps_key(eps)]
    return dict(
        mIoU=at['worst_case']['mIoU'],
        aACC=at['worst_case']['aAcc_img'],
        clean_mIoU=summary['clean']['mIoU'],
        clean_aACC=summary['clean']['aAcc_img'],
        images=summary['num_images'],
        seconds=round(seconds, 1),
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--checkpoint', default=DEFAULT_CHECKPOINT)
    parser.add_argument('--data-root', help='the synthetic data (default: config)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--options',
        nargs='+',
        help='option sets, names joined by + (default: all the device runs)',
    )
    parser.add_argument('--batch', type=int, default=8, help='images of a timed pass')
    parser.add_argument(
        '--size',
        type=int,
        help='time random SIZE x SIZE images on the model with random weights '
        '(a paper-size model; with --no-strength)',
    )
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--images', type=int, default=8, help='images of the SEA run')
    parser.add_argument('--steps', type=int, default=50, help='SEA iterations')
    parser.add_argument('--eps', type=float, default=8.0)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, help='torch intra-op threads')
    parser.add_argument('--no-strength', action='store_true', help='speed only')
    parser.add_argument(
        '--warm-compile-cache',
        action='store_true',
        help="use inductor's on-disk caches (default: off, so that the first "
        'pass with compile times a first compilation)',
    )
    parser.add_argument('--out', required=True)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    from frontier import class_weights_for, load_model, versions

    from mmseg_robust.models import resolve_speedups

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.warm_compile_cache:
        import torch._inductor.config

        # what a first evaluation on a machine pays; later ones reuse the cache
        torch._inductor.config.force_disable_caches = True
    device = torch.device(args.device)
    option_sets = args.options or list(
        GPU_OPTIONS if device.type == 'cuda' else CPU_OPTIONS
    )
    for names in option_sets:
        resolve_speedups(names.split('+'))  # unknown names fail before any work
    checkpoint = args.checkpoint
    if not osp.isabs(checkpoint):
        checkpoint = osp.join(REPO, checkpoint)
    if args.size:
        if not args.no_strength:
            raise SystemExit(
                '--size times random images on a randomly initialised model: '
                'pass --no-strength (the strength runs need a trained checkpoint '
                'and its test data)'
            )
        model, batch, ignore = random_model_and_batch(
            args.config, args.batch, args.size, device
        )
    else:
        if args.images < args.batch:
            raise SystemExit('--images must be at least --batch')
        model, loader, cfg, ignore = load_model(
            args.config,
            checkpoint,
            args.data_root,
            images=args.images,
            batch=args.batch,
        )
        model.to(device)
        batch = next(iter(loader))
    print(f'speed: batch {args.batch}, {args.repeats} repeats on {device}', flush=True)
    speed = time_passes(model, batch, option_sets, args.repeats, device)
    strength = {}
    if not args.no_strength:
        weights = class_weights_for(cfg, {}, args.data_root)
        attack = dict(type='SEA', steps=args.steps, class_weights=weights)
        for names in ['plain'] + option_sets:
            speedups = None if names == 'plain' else names.split('+')
            torch._dynamo.reset()  # each SEA run compiles from scratch
            strength[names] = sea_strength(
                model, loader, ignore, attack, args.eps, args.seed, speedups
            )
            print(f'SEA {names}: {strength[names]}', flush=True)
        ref = strength['plain']
        for names in option_sets:
            row = strength[names]
            row['mIoU_diff'] = round(row['mIoU'] - ref['mIoU'], 3)
            row['aACC_diff'] = round(row['aACC'] - ref['aACC'], 3)
    image_shape = tuple(int(s) for s in batch['inputs'][0].shape[1:])
    result = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        machine=dict(
            processor=platform.machine(),
            device=torch.cuda.get_device_name(device)
            if device.type == 'cuda'
            else 'cpu',
            torch_threads=torch.get_num_threads(),
        ),
        versions=versions(),
        settings=dict(
            config=args.config,
            checkpoint='random weights' if args.size else args.checkpoint,
            batch=args.batch,
            image_shape=image_shape,
            repeats=args.repeats,
            sea=dict(
                steps=args.steps, images=args.images, eps=args.eps, seed=args.seed
            ),
            compile='torch.compile defaults (inductor)',
            inductor_caches=bool(args.warm_compile_cache),
        ),
        speed=speed,
        strength=strength,
        command=' '.join(sys.argv),
    )
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'wrote {args.out}')
    return result


if __name__ == '__main__':
    main()
