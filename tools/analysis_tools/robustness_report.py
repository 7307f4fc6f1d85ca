"""A robustness report from results files: adversarial and corruption results,
those of one model side by side.

    python tools/analysis_tools/robustness_report.py FILE [FILE ...] \
        [--names NAME ...] [--out-dir DIR] [--title TITLE]

Each FILE is a ``robustness_<timestamp>.json`` written by ``tools/test.py CFG
CKPT --cfg-options evaluator=SEA`` (or another attack) or ``evaluator=Corruptions``.
Files of one model (the same name: by default the folder of the checkpoint)
make one row, so a model's SEA file and its corruption file are shown together
(:func:`mmseg_robust.reporting.load_rows`). Writes ``report.md``,
``report.json`` and the plots (``robustness_curve.png``; with corruption results
``corruption_heatmap.png`` and ``corruption_severity.png``) to ``--out-dir``.
"""

import argparse
import os.path as osp

from mmseg_robust.reporting import load_rows, write_report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Robustness report (tables and plots) from results files'
    )
    parser.add_argument(
        'files',
        nargs='+',
        help='robustness_<timestamp>.json files (adversarial '
        'or corruption evaluations)',
    )
    parser.add_argument(
        '--names',
        nargs='+',
        default=None,
        help='a model name per file (default: the folder of its checkpoint); '
        'files of one name are one model',
    )
    parser.add_argument('--out-dir', default=osp.join('work_dirs', 'report'))
    parser.add_argument('--title', default='Robustness report')
    args = parser.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.files):
        parser.error(
            f'--names gives {len(args.names)} names for {len(args.files)} files: '
            'give one name per file'
        )
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        rows = load_rows(args.files, args.names)
    except (OSError, ValueError) as e:
        raise SystemExit(f'robustness_report.py: {e}') from None
    paths = write_report(rows, args.out_dir, title=args.title)
    for what, path in paths.items():
        print(f'{what}: {path}')
    return paths


if __name__ == '__main__':
    main()
