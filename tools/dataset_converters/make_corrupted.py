"""Write a corrupted copy of a config's test set (ADE20K-C, Cityscapes-C, VOC-C).

    python tools/dataset_converters/make_corrupted.py CONFIG --out DIR \\
        [--corruptions benchmark] [--severities 1,2,3,4,5] [--seed 0] \\
        [--split test] [--format png] [--workers N] [--cfg-options KEY=VALUE ...]

For each corruption and severity, ``DIR/<corruption>/<severity>/`` mirrors the
dataset's ``data_root``: every test image, corrupted, at its path relative to
``data_root``; its annotation (hard-linked, or copied where a link cannot be
made) and the split file (``ann_file``, e.g. VOC's
``ImageSets/Segmentation/val.txt``) at theirs. Any mmseg config then tests on
it without this package::

    python tools/test.py CONFIG CKPT --cfg-options \\
        test_dataloader.dataset.data_root=DIR/fog/3 \\
        test_dataloader.dataset.img_suffix=.png

(the tool prints these options). Each image is exactly what
``--cfg-options evaluator=Corruptions`` feeds the test pipeline: it is loaded
by the config's own transforms up to the image loading one
(``LoadImageFromFile``), then corrupted by the same ``Corrupt`` transform with
the same seed (``mmseg_robust.datasets.with_corruption`` and
``corruption_seed``, docs/algorithms.md section 8). So the pre-generated set
gives the evaluator's per-corruption numbers, provided it is written
losslessly: PNG (the default; a ``.jpg`` image becomes ``.png``, hence the
``img_suffix`` option) is read back and checked against the corrupted image.
``--format jpg`` keeps the file names of a JPEG dataset but adds JPEG's own
compression to the corruption, which changes the numbers.

``DIR/make_corrupted.json`` records the config, the seed, the corruptions and
severities and the versions of the libraries the images depend on.
"""

import argparse
import json
import os
import os.path as osp
import shutil
import sys
import time

import cv2
import mmcv
import numpy as np
from mmengine.config import Config, DictAction
from mmengine.dataset import Compose
from mmengine.registry import init_default_scope
from mmengine.utils import ProgressBar

import mmseg_robust  # noqa: F401 (registers Corrupt and the package's datasets)
from mmseg_robust.datasets.corruptions import (
    Corrupt,
    corruption_library_versions,
    resolve_corruptions,
    resolve_severities,
    with_corruption,
)

FORMATS = {'png': '.png', 'jpg': '.jpg'}
#: The state the worker processes read (set before the pool forks).
_JOB = {}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Write the corrupted test set of a config in the '
        "dataset's own layout (ADE20K-C, Cityscapes-C, VOC-C)."
    )
    parser.add_argument('config', help='an mmseg config (its test set is corrupted)')
    parser.add_argument(
        '--out', required=True, help='output folder: OUT/<corruption>/<severity>/'
    )
    parser.add_argument(
        '--corruptions',
        default='benchmark',
        help='benchmark (the 15), all (19), a category (noise, blur, weather, '
        'digital, holdout) or comma-separated names. Default: benchmark',
    )
    parser.add_argument(
        '--severities', default='1,2,3,4,5', help='in 1..5, e.g. 1,3. Default: all'
    )
    parser.add_argument(
        '--seed',
        type=int,
        default=0,
        help="the corruptions' seed (the evaluator's evaluator.seed). Default: 0",
    )
    parser.add_argument(
        '--split',
        choices=('test', 'val'),
        default='test',
        help='the dataset of test_dataloader or val_dataloader. Default: test',
    )
    parser.add_argument(
        '--format',
        choices=sorted(FORMATS),
        default='png',
        help='png (lossless, the default) or jpg (smaller, but its compression '
        'changes the numbers)',
    )
    parser.add_argument(
        '--jpg-quality', type=int, default=95, help='with --format jpg. Default: 95'
    )
    parser.add_argument(
        '--workers',
        type=int,
        default=1,
        help='processes writing images in parallel (Linux). Default: 1',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, as in tools/test.py (e.g. '
        'test_dataloader.dataset.data_root=data/ade/ADEChallengeData2016)',
    )
    return parser.parse_args(argv)


def _inside(path, root):
    """``path`` relative to ``root``, or None where it lies outside it."""
    rel = osp.relpath(osp.abspath(path), osp.abspath(root))
    return None if rel == '..' or rel.startswith('..' + os.sep) else rel


def build_dataset(cfg, split):
    """The config's test (or val) dataset; an mmseg segmentation dataset with a
    ``data_root``, or a ValueError saying why it cannot be written."""
    from mmseg.datasets import BaseSegDataset
    from mmseg.registry import DATASETS

    loader = cfg.get(f'{split}_dataloader')
    if not loader or not loader.get('dataset'):
        raise ValueError(f'the config has no {split}_dataloader.dataset')
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    dataset = DATASETS.build(loader.dataset)
    if not isinstance(dataset, BaseSegDataset):
        raise ValueError(
            f'{split}_dataloader.dataset is a {type(dataset).__name__}: only an '
            'mmseg segmentation dataset (a BaseSegDataset: ADE20KDataset, '
            'CityscapesDataset, PascalVOCDataset, ...) can be written in its own '
            'layout; dataset wrappers (ConcatDataset, RepeatDataset) and '
            'generated datasets are not supported, point the config at one '
            'dataset on disk'
        )
    if not dataset.data_root:
        raise ValueError(
            f'{split}_dataloader.dataset has no data_root: the output mirrors '
            'the files relative to data_root; set it (--cfg-options '
            f'{split}_dataloader.dataset.data_root=PATH)'
        )
    dataset.full_init()
    if len(dataset) == 0:
        raise ValueError(
            f'the dataset under {dataset.data_root} is empty: check data_root, '
            'data_prefix and img_suffix'
        )
    return dataset


def _loader_and_corrupt(dataset, corruption, severity, seed):
    """The transforms up to the image loading one (a Compose) and the
    ``Corrupt`` the evaluator puts after it."""
    transforms = with_corruption(
        dataset.pipeline.transforms, corruption, severity, seed
    )
    (k,) = [i for i, t in enumerate(transforms) if isinstance(t, Corrupt)]
    return Compose(transforms[:k]), transforms[k]


def plan(dataset, corruptions, severities, seed, fmt):
    """What to write: the loading transforms, the ``Corrupt`` per unit, the
    image names and the new ``img_suffix``."""
    loading = None
    corrupts = {}
    for c in corruptions:
        for s in severities:
            loading, corrupts[(c, s)] = _loader_and_corrupt(dataset, c, s, seed)
    suffix = dataset.img_suffix
    dot = suffix.rfind('.')  # not splitext: it takes '.jpg' for a stem
    stem = suffix[:dot]
    if dot < 0 or dot == len(suffix) - 1:
        raise ValueError(
            f'img_suffix {suffix!r} has no file extension: cannot name the '
            'written images'
        )
    new_suffix = stem + FORMATS[fmt]
    root = dataset.data_root
    items = []
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        img = info['img_path']
        rel = _inside(img, root)
        if rel is None:
            raise ValueError(
                f'the image {img} lies outside data_root {root}: the output '
                'mirrors the files relative to data_root; set data_root to a '
                'folder that holds the images and annotations'
            )
        if not rel.endswith(suffix):
            raise ValueError(f'the image {img} does not end with img_suffix {suffix!r}')
        links = []
        seg = info.get('seg_map_path')
        if seg:
            seg_rel = _inside(seg, root)
            if seg_rel is None:
                raise ValueError(
                    f'the annotation {seg} lies outside data_root {root}: set '
                    'data_root to a folder that holds the images and annotations'
                )
            links.append((seg, seg_rel))
        items.append((i, rel[: -len(suffix)] + new_suffix, links))
    return loading, corrupts, items, new_suffix


def _link(src, dst):
    """Hard link ``src`` at ``dst`` (a copy where linking fails)."""
    os.makedirs(osp.dirname(dst), exist_ok=True)
    if osp.lexists(dst):
        if osp.exists(dst) and osp.samefile(src, dst):
            return
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _to_bgr(img, channel_order):
    # cv2 writes BGR; the loader gives what its channel_order says
    if img.ndim == 3 and channel_order == 'rgb':
        return np.ascontiguousarray(img[..., ::-1])
    return img


def _write_image(index):
    """Load image ``index`` once, write its corrupted copies and annotations."""
    job = _JOB
    dataset, out = job['dataset'], job['out']
    i, rel, links = job['items'][index]
    loaded = job['loading'](dataset.get_data_info(i))
    if loaded is None:
        raise RuntimeError(f'the loading transforms dropped image {i}')
    for (c, s), corrupt in job['corrupts'].items():
        unit_root = osp.join(out, c, str(s))
        path = osp.join(unit_root, rel)
        img = corrupt(dict(loaded))['img']
        params = None
        if job['format'] == 'jpg':
            params = [cv2.IMWRITE_JPEG_QUALITY, job['jpg_quality']]
        os.makedirs(osp.dirname(path), exist_ok=True)
        if not mmcv.imwrite(_to_bgr(img, corrupt.channel_order), path, params=params):
            raise RuntimeError(f'could not write {path}')
        if job['format'] == 'png':
            back = job['loading'](dict(img_path=path))['img']
            if back.shape != img.shape or not np.array_equal(back, img):
                raise RuntimeError(
                    f'{path} does not read back as the corrupted image: the '
                    "config's image loading transform changes PNG images"
                )
        for src, src_rel in links:
            _link(src, osp.join(unit_root, src_rel))
    return index


def _shard(worker, workers, n, queue):
    """A forked worker: images ``worker, worker + workers, ...``; reports each
    written image (or the error) on ``queue``."""
    try:
        for index in range(worker, n, workers):
            queue.put(('done', _write_image(index)))
    except BaseException:
        import traceback

        queue.put(('error', traceback.format_exc()))
        raise


def _run(n, workers):
    """Write the ``n`` images, in ``workers`` forked processes (the functions
    are not pickled: the tool also runs as a script or loaded by path)."""
    bar = ProgressBar(n)
    if workers <= 1 or n <= 1:
        for index in range(n):
            _write_image(index)
            bar.update()
        sys.stdout.write('\n')
        return
    import multiprocessing as mp

    if 'fork' not in mp.get_all_start_methods():
        raise ValueError('--workers above 1 needs the fork start method (Linux)')
    ctx = mp.get_context('fork')
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_shard, args=(w, workers, n, queue), daemon=True)
        for w in range(min(workers, n))
    ]
    for p in procs:
        p.start()
    try:
        for _ in range(n):
            kind, value = queue.get()
            if kind == 'error':
                raise RuntimeError(f'a worker failed:\n{value}')
            bar.update()
    finally:
        for p in procs:
            if p.is_alive() and p.exitcode is None:
                p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    sys.stdout.write('\n')


def make_corrupted(args):
    """Write the corrupted sets; returns the manifest (also written to
    ``OUT/make_corrupted.json``)."""
    corruptions = resolve_corruptions(args.corruptions)
    severities = resolve_severities(args.severities)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    dataset = build_dataset(cfg, args.split)
    out = osp.abspath(args.out)
    root = dataset.data_root
    if _inside(out, root) is not None or _inside(root, out) is not None:
        raise ValueError(
            f'--out {out} and data_root {root} overlap: the corrupted copies '
            'would mix with the dataset; write them to a separate folder'
        )
    loading, corrupts, items, new_suffix = plan(
        dataset, corruptions, severities, args.seed, args.format
    )
    ann_file = dataset.ann_file
    if ann_file and osp.isfile(ann_file):
        ann_rel = _inside(ann_file, root)
        if ann_rel is None:
            raise ValueError(
                f'the split file {ann_file} lies outside data_root {root}: put it '
                'under data_root (and ann_file relative to it)'
            )
        for c, s in corrupts:
            _link(ann_file, osp.join(out, c, str(s), ann_rel))
    _JOB.update(
        dataset=dataset,
        out=out,
        items=items,
        loading=loading,
        corrupts=corrupts,
        format=args.format,
        jpg_quality=args.jpg_quality,
    )
    print(
        f'{len(items)} images x {len(corruptions)} corruptions x severities '
        f'{severities} -> {out}',
        flush=True,
    )
    start = time.time()
    try:
        _run(len(items), args.workers)
    finally:
        _JOB.clear()
    manifest = dict(
        config=osp.abspath(args.config),
        cfg_options=args.cfg_options or {},
        split=args.split,
        data_root=osp.abspath(root),
        num_images=len(items),
        corruptions=corruptions,
        severities=severities,
        seed=args.seed,
        format=args.format,
        img_suffix=new_suffix,
        libraries=corruption_library_versions(),
        seconds=round(time.time() - start, 1),
    )
    if args.format == 'jpg':
        manifest['jpg_quality'] = args.jpg_quality
    with open(osp.join(out, 'make_corrupted.json'), 'w') as f:
        json.dump(manifest, f, indent=1, default=str)
    key = f'{args.split}_dataloader.dataset'
    options = [f'{key}.data_root={osp.join(out, corruptions[0], str(severities[0]))}']
    if new_suffix != dataset.img_suffix:
        options.append(f'{key}.img_suffix={new_suffix}')
    print(
        f'Wrote {out}/<corruption>/<severity>/. Test a config on one of them '
        f'({corruptions[0]}, severity {severities[0]} here) with\n'
        f'  --cfg-options {" ".join(options)}'
    )
    if args.format == 'jpg':
        print(
            'Note: JPEG compression changes the corrupted images, so the numbers '
            'differ from those of evaluator=Corruptions; --format png gives them.'
        )
    return manifest


def main(argv=None):
    args = parse_args(argv)
    try:
        make_corrupted(args)
    except ValueError as e:
        raise SystemExit(f'make_corrupted.py: error: {e}') from None


if __name__ == '__main__':
    main()
