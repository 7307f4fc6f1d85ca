"""Time each common corruption (``mmseg_robust.datasets.corrupt_image``, what
``evaluator=Corruptions`` adds to a pass per image; the model's forward is not
included) at 512x512 and 1024x2048 (height x width).

    python benchmarks/corruption_time.py [--severities 3|all] [--repeats 3]
        [--sizes 512x512,1024x2048] [--out J]

The image: the largest image of the miniature Cityscapes of
``tests/mini_datasets.py`` (a rendered street scene, 1024x512 pixels, written
as PNG and read back), its central 512x512 crop for 512x512 and the whole
image upsampled 2x (bilinear) for 1024x2048. Per corruption, severity and
size: one first call (for ``glass_blur`` at the first size it includes numba's
compile of its pixel shuffle, reported as ``compile_s``), then the median of
``--repeats`` calls, each with a new seed, as the evaluator's images have.
One process, one thread for OpenCV and numpy's BLAS (set before the imports
below).
"""

import os

for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os.path as osp  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from mmseg_robust.datasets.corruptions import (  # noqa: E402
    CORRUPTIONS,
    SEVERITIES,
    category_of,
    corrupt_image,
    corruption_library_versions,  # noqa: E402
    corruption_seed,
)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _sizes(text):
    sizes = []
    for item in text.split(','):
        h, w = (int(v) for v in item.lower().split('x'))
        sizes.append((h, w))
    return sizes


def source_image():
    """The miniature Cityscapes' largest image (BGR, 512x1024), as written."""
    sys.path.insert(0, osp.join(REPO, 'tests'))
    from mini_datasets import make_mini_cityscapes

    with tempfile.TemporaryDirectory() as tmp:
        root = make_mini_cityscapes(tmp)
        paths = [
            osp.join(d, f)
            for d, _, files in os.walk(osp.join(root, 'leftImg8bit'))
            for f in files
        ]
        imgs = {p: cv2.imread(p, cv2.IMREAD_COLOR) for p in paths}
    path = max(imgs, key=lambda p: imgs[p].size)
    return imgs[path], osp.relpath(path, osp.join(root, 'leftImg8bit'))


def image_at(src, h, w):
    """``src`` as an h x w image: a central crop where it is large enough,
    else the whole image resized (bilinear)."""
    sh, sw = src.shape[:2]
    if h <= sh and w <= sw:
        y, x = (sh - h) // 2, (sw - w) // 2
        return np.ascontiguousarray(src[y : y + h, x : x + w])
    return cv2.resize(src, (w, h), interpolation=cv2.INTER_LINEAR)


def time_one(img, corruption, severity, seed, name):
    start = time.perf_counter()
    corrupt_image(
        img, corruption, severity, corruption_seed(seed, name, corruption, severity)
    )
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--corruptions', default='all', help='all, or names')
    parser.add_argument('--severities', default='3', help="e.g. 3, 1,5 or 'all'")
    parser.add_argument('--sizes', default='512x512,1024x2048', help='HxW,...')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument(
        '--out', default=None, help='JSON (default: benchmarks/results/)'
    )
    parser.add_argument('--note', default='', help='recorded in the JSON')
    args = parser.parse_args(argv)

    names = CORRUPTIONS if args.corruptions == 'all' else args.corruptions.split(',')
    severities = (
        list(SEVERITIES)
        if args.severities == 'all'
        else [int(s) for s in args.severities.split(',')]
    )
    sizes = _sizes(args.sizes)
    src, src_name = source_image()
    images = {size: image_at(src, *size) for size in sizes}
    rows = []
    compile_s = None
    for c in names:
        for s in severities:
            row = dict(corruption=c, category=category_of(c), severity=s)
            for h, w in sizes:
                img = images[(h, w)]
                first = time_one(img, c, s, 0, 'first.png')
                times = [
                    time_one(img, c, s, 0, f'repeat{r}.png')
                    for r in range(args.repeats)
                ]
                median = statistics.median(times)
                if c == 'glass_blur' and compile_s is None:
                    compile_s = first - median
                row[f'{h}x{w}'] = dict(median_s=median, first_s=first, times_s=times)
            rows.append(row)
            cells = '  '.join(
                f'{h}x{w}: {1000 * row[f"{h}x{w}"]["median_s"]:9.1f} ms'
                for h, w in sizes
            )
            print(f'{c:18s} severity {s}  {cells}', flush=True)

    date = datetime.date.today().isoformat()
    result = dict(
        script='benchmarks/corruption_time.py',
        command='python benchmarks/corruption_time.py '
        + ' '.join(argv or sys.argv[1:]),
        date=date,
        machine=dict(
            processor=platform.processor() or platform.machine(),
            machine=platform.machine(),
            cpus=os.cpu_count(),
            python=platform.python_version(),
        ),
        threads='1 (OMP/OpenBLAS/MKL_NUM_THREADS=1, cv2.setNumThreads(1))',
        image=(
            f'tests/mini_datasets.py make_mini_cityscapes, {src_name} '
            f'({src.shape[1]}x{src.shape[0]}): central crop for sizes it holds, '
            'bilinear resize otherwise'
        ),
        timed='mmseg_robust.datasets.corrupt_image (uint8 BGR in, out), no model',
        repeats=args.repeats,
        statistic='median over repeats, after one first call per corruption, '
        'severity and size',
        numba_compile_s=compile_s,
        libraries=corruption_library_versions(),
        note=args.note,
        rows=rows,
    )
    out = args.out or osp.join(
        REPO, 'benchmarks', 'results', f'corruption_time_cpu_{date}.json'
    )
    with open(out, 'w') as f:
        json.dump(result, f, indent=1)

    # the table (docs/benchmarks.md)
    head = ' | '.join(f'{h}x{w} (ms)' for h, w in sizes)
    print(f'\n| corruption | category | severity | {head} |')
    print('|---|---|---|' + '---|' * len(sizes))
    for row in rows:
        cells = ' | '.join(
            f'{1000 * row[f"{h}x{w}"]["median_s"]:.1f}' for h, w in sizes
        )
        print(
            f'| {row["corruption"]} | {row["category"]} | {row["severity"]} | {cells} |'
        )
    if compile_s is not None:
        print(
            f'\nglass_blur first call (numba compile): {compile_s:.2f} s more '
            'than its median'
        )
    print(f'JSON: {out}')


if __name__ == '__main__':
    cv2.setNumThreads(1)
    main()
