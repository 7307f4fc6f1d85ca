"""Robustness curve of one model: mIoU and aACC against eps.

    python tools/analysis_tools/robustness_curve.py CONFIG CHECKPOINT \
        --eps 0 2 4 8 [--attack SEA] [--steps 300] [--num-images N] \
        [--work-dir DIR] [--name NAME] [--show-dir DIR] [--cfg-options ...]

Runs the robustness evaluation of ``tools/test.py ... --cfg-options evaluator=SEA``
at every eps > 0 (eps 0 is the clean model, always evaluated) and writes to
``WORK_DIR/robustness_curve/``: ``report.md`` and ``report.json`` (the table) and
``robustness_curve.png`` (the plot). Works with ``--launcher pytorch|slurm`` like
``tools/test.py``; an interrupted run restarted with the same command resumes.

``--cfg-options`` takes the options of ``tools/test.py``, the ``evaluator.*``
ones included (``evaluator.norm=L2``, ``evaluator.class_weights=voc``,
``evaluator.compat=reference`` ...), except those this tool sets from its own
arguments: ``evaluator.type`` (``--attack``), ``evaluator.eps`` (``--eps``),
``evaluator.steps``/``evaluator.n_iter`` (``--steps``) and ``evaluator.seed``
(``--seed``) are refused with the argument to use.
"""

import argparse
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.dist import get_rank
from mmengine.runner import Runner

import mmseg_robust  # noqa: F401
from mmseg_robust.engine import (
    EVALUATOR_PRESETS,
    add_adversarial_visualization,
    apply_robustness_evaluator,
)
from mmseg_robust.evaluation import RobustnessMetric
from mmseg_robust.reporting import load_result, shared_settings, write_report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Robustness curve (mIoU/aACC against eps) of a model'
    )
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--eps',
        type=float,
        nargs='+',
        default=[0, 2, 4, 8],
        help='radii in /255 units; 0 is the clean model',
    )
    parser.add_argument(
        '--attack',
        default='SEA',
        choices=sorted(EVALUATOR_PRESETS),
        help='attack (evaluator preset)',
    )
    parser.add_argument(
        '--steps',
        '--n-iter',
        type=int,
        default=None,
        help="attack iterations (default: the preset's)",
    )
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--num-images',
        type=int,
        default=None,
        help='evaluate the first N test images only (N >= 1; default: all)',
    )
    parser.add_argument(
        '--name',
        default=None,
        help='model name in the table and plot (default: the config name)',
    )
    parser.add_argument('--work-dir', default=None)
    parser.add_argument(
        '--show-dir',
        default=None,
        help='also save the adversarial examples (largest eps)',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, as in tools/test.py '
        '(evaluator.* options too, except evaluator.type/eps/steps/n_iter/seed: '
        'use --attack/--eps/--steps/--seed)',
    )
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none'
    )
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    if args.num_images is not None and args.num_images < 1:
        parser.error(
            f'--num-images must be >= 1, got {args.num_images}; leave it out '
            'to evaluate every test image'
        )
    if any(e < 0 for e in args.eps):
        parser.error(f'--eps must be >= 0, got {args.eps}')
    if not any(e > 0 for e in args.eps):
        parser.error(
            '--eps needs at least one radius > 0 (0 is the clean '
            'model, evaluated anyway)'
        )
    return args


#: evaluator options this tool sets from its own arguments.
OWN_OPTIONS = dict(
    type='--attack', eps='--eps', steps='--steps', n_iter='--steps', seed='--seed'
)


def evaluator_options(cfg_options: dict) -> tuple:
    """Split ``--cfg-options`` into the config's options and the evaluator's
    (``evaluator.norm=L2`` -> ``{'norm': 'L2'}``), as tools/test.py reads them.

    Raises:
        SystemExit: an option this tool sets from its own arguments
            (``evaluator=NAME``, ``evaluator.eps`` ...), naming the argument.
    """
    options, spec = {}, {}
    for key, value in (cfg_options or {}).items():
        if key == 'evaluator':
            raise SystemExit(
                f"--cfg-options evaluator={value}: the curve's attack is chosen "
                'with --attack NAME'
            )
        if key.startswith('evaluator.'):
            name = key[len('evaluator.') :]
            if name in OWN_OPTIONS:
                raise SystemExit(
                    f'--cfg-options {key}={value}: use {OWN_OPTIONS[name]} '
                    'instead (this tool sets it)'
                )
            spec[name] = value
        else:
            options[key] = value
    return options, spec


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    options, evaluator = evaluator_options(args.cfg_options)
    if options:
        cfg.merge_from_dict(options)
    name = args.name or osp.splitext(osp.basename(args.config))[0]
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', name)
    cfg.load_from = args.checkpoint
    spec = dict(
        evaluator,
        type=args.attack,
        eps=sorted({e for e in args.eps if e > 0}),
        seed=args.seed,
    )
    if args.steps is not None:
        spec['steps'] = args.steps
    apply_robustness_evaluator(cfg, spec)
    if args.num_images is not None:
        cfg.test_dataloader.dataset.indices = args.num_images
    if args.show_dir:
        add_adversarial_visualization(cfg, args.show_dir)

    runner = Runner.from_cfg(cfg)
    runner.test()
    if get_rank() != 0:
        return {}
    (metric,) = [
        m for m in runner.test_evaluator.metrics if isinstance(m, RobustnessMetric)
    ]
    row = load_result(metric.results_path, name=name)
    settings = dict(shared_settings([row]), checkpoint=args.checkpoint)
    paths = write_report(
        [row],
        osp.join(runner.work_dir, 'robustness_curve'),
        title=f'Robustness curve: {name}',
        settings=settings,
    )
    print(f'results file: {metric.results_path}')
    for what, path in paths.items():
        print(f'{what}: {path}')
    return paths


if __name__ == '__main__':
    main()
