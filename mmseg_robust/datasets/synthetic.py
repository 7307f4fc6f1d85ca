"""Embedded synthetic semantic-segmentation dataset ("synthetic shapes").

A deterministic dataset that needs no download: textured shapes of four classes on
cluttered, textured backgrounds. It is generated on first use into ``data_root`` in
mmseg's standard layout::

    data_root/
      img_dir/{train,val}/00000.png   RGB images (written as 3-channel PNG)
      ann_dir/{train,val}/00000.png   uint8 label maps, 0 = background, 1..4 shapes
      meta.json                       generator parameters (checked on reuse)

and read through mmseg's normal loading pipeline (``LoadImageFromFile``,
``LoadAnnotations``). One to three shapes per image, not overlapping, on a
smooth greyish background with a faint texture and a little clutter (thin lines
and dots, labelled background). Each class has its own shape, its own texture
(smooth, stripes, checkerboard, dots) and its own tint (a few times eps 8/255,
jittered per object; the texture's second colour is random): a task the small
UperNet learns in minutes (83 mIoU on val after 1000 iterations) and an
undefended model loses under SEA at 8/255 (5 mIoU).
"""

import json
import os
import os.path as osp
import shutil
import tempfile
from typing import Dict, Optional

import cv2
import numpy as np
from mmseg.datasets import BaseSegDataset

from mmseg_robust.registry import DATASETS

#: Bump when the generator's output changes, so stale folders are regenerated.
GENERATOR_VERSION = 4

CLASSES = ('background', 'disk', 'square', 'triangle', 'cross')
PALETTE = [[0, 0, 0], [220, 20, 60], [0, 130, 200], [60, 180, 75], [255, 200, 0]]

DEFAULT_SPLITS = dict(train=1000, val=100)


def _texture(
    rng: np.random.Generator, kind: int, size: int, periods=(6.0, 10.0)
) -> np.ndarray:
    """A (size, size) float pattern in [0, 1] of one of four texture kinds."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(*periods)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    if kind == 0:  # smooth
        return np.ones((size, size), np.float32)
    if kind == 1:  # stripes
        return 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * u / period))
    if kind == 2:  # checkerboard
        return 0.5 + 0.5 * np.sign(
            np.sin(np.pi * u / period * 2) * np.sin(np.pi * v / period * 2)
        )
    # dots
    return 0.5 + 0.5 * np.cos(2 * np.pi * u / period) * np.cos(2 * np.pi * v / period)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(30, 225, size=3).astype(np.float32)


#: the tint of each shape class (RGB levels added to a greyish colour): a colour
#: cue a small model picks up fast, yet only a few times eps 8/255
CLASS_TINTS = np.array(
    [[0, 0, 0], [25, -12, -12], [-12, -12, 25], [-12, 25, -12], [18, 18, -25]],
    np.float32,
)


def _class_colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    grey = rng.uniform(70, 185)
    jitter = rng.uniform(-10, 10, size=3)
    return np.clip(grey + CLASS_TINTS[cls] + jitter, 0, 255).astype(np.float32)


def _shape_mask(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """Binary mask of one shape of class ``cls`` at a random place and scale."""
    mask = np.zeros((size, size), np.uint8)
    r = rng.uniform(0.16, 0.3) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    if cls == 1:  # disk
        cv2.circle(mask, (int(cx), int(cy)), int(r), 1, -1)
    elif cls == 2:  # rotated square
        box = cv2.boxPoints(((cx, cy), (1.7 * r, 1.7 * r), rng.uniform(0, 90)))
        cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
    elif cls == 3:  # triangle
        a0 = rng.uniform(0, 2 * np.pi)
        pts = [
            (
                cx + r * 1.2 * np.cos(a0 + k * 2 * np.pi / 3),
                cy + r * 1.2 * np.sin(a0 + k * 2 * np.pi / 3),
            )
            for k in range(3)
        ]
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    else:  # cross (plus sign)
        w = max(3, int(r * 0.7))
        x0, y0, rr = int(cx), int(cy), int(r)
        cv2.rectangle(mask, (x0 - rr, y0 - w // 2), (x0 + rr, y0 + w // 2), 1, -1)
        cv2.rectangle(mask, (x0 - w // 2, y0 - rr), (x0 + w // 2, y0 + rr), 1, -1)
    return mask.astype(bool)


def render_sample(seed: int, size: int = 64):
    """Render one (image, label) pair deterministically from ``seed``.

    Returns:
        tuple[np.ndarray, np.ndarray]: RGB image (size, size, 3) uint8 and label map
        (size, size) uint8 with values in 0..4.
    """
    rng = np.random.default_rng(seed)
    # Background: a smooth random colour field, a faint texture and a little
    # clutter (thin lines and small blobs, labelled background).
    low = rng.uniform(60, 190, size=(3, 3, 1)) + rng.uniform(-15, 15, size=(3, 3, 3))
    low = low.astype(np.float32)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    bg_tex = _texture(rng, int(rng.integers(0, 4)), size)
    img = img + (bg_tex[..., None] - 0.5) * rng.uniform(4, 12)
    for _ in range(int(rng.integers(0, 3))):
        colour = tuple(float(c) for c in _colour(rng))
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        if rng.random() < 0.5:
            p1 = tuple(int(v) for v in rng.integers(0, size, 2))
            cv2.line(img, p0, p1, colour, 1)
        else:
            cv2.circle(img, p0, int(rng.integers(1, 3)), colour, -1)
    label = np.zeros((size, size), np.uint8)
    # Objects: each class has its own shape, texture and tint. Objects do not
    # overlap (a shape that would touch an earlier one is redrawn elsewhere, or
    # dropped), so every object shows its whole outline. The texture is a
    # modulation of 30-50 intensity levels (4-6 times eps 8/255).
    occupied = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, len(CLASSES)))
        for _try in range(10):
            mask = _shape_mask(rng, cls, size)
            grown = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8))
            if not (grown.astype(bool) & occupied).any():
                break
        else:
            continue
        occupied |= mask
        tex = _texture(rng, cls - 1, size, periods=(8.0, 14.0))
        c1 = _class_colour(rng, cls)
        contrast = rng.uniform(30, 50) * rng.choice([-1.0, 1.0], size=3)
        c2 = np.clip(c1 + contrast, 0, 255).astype(np.float32)
        t = tex[..., None]
        fill = c1[None, None] * t + c2[None, None] * (1 - t)
        img[mask] = fill[mask]
        label[mask] = cls
    img = img + rng.normal(0, 3, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


def _write_split(root: str, split: str, num: int, size: int, seed: int):
    os.makedirs(osp.join(root, 'img_dir', split))
    os.makedirs(osp.join(root, 'ann_dir', split))
    # Disjoint seed ranges per split.
    offset = {'train': 0, 'val': 1_000_000}.get(split, 2_000_000)
    for i in range(num):
        img, label = render_sample(seed * 10_000_000 + offset + i, size)
        name = f'{i:05d}.png'
        cv2.imwrite(osp.join(root, 'img_dir', split, name), img[..., ::-1])
        cv2.imwrite(osp.join(root, 'ann_dir', split, name), label)


def generate_synthetic_dataset(
    data_root: str,
    splits: Optional[Dict[str, int]] = None,
    size: int = 64,
    seed: int = 0,
) -> str:
    """Generate the synthetic dataset into ``data_root`` unless it is already there.

    Idempotent and safe under concurrent callers (e.g. every rank of a distributed
    job): each caller renders into its own temporary folder and atomically renames it
    to ``data_root``; a caller that loses the race discards its copy (the content is
    identical, being deterministic).

    Args:
        data_root (str): Destination folder.
        splits (dict[str, int], optional): Images per split. Defaults to
            ``{'train': 1000, 'val': 100}``.
        size (int): Image side in pixels. Defaults to 64.
        seed (int): Generator seed. Defaults to 0.

    Returns:
        str: ``data_root``.

    Raises:
        RuntimeError: If ``data_root`` holds a dataset generated with other
            parameters (delete the folder or choose another ``data_root``).
    """
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    meta = dict(
        generator='mmseg_robust.synthetic_shapes',
        version=GENERATOR_VERSION,
        splits=splits,
        size=size,
        seed=seed,
        classes=list(CLASSES),
    )
    meta_file = osp.join(data_root, 'meta.json')
    if osp.exists(meta_file):
        with open(meta_file) as f:
            found = json.load(f)
        if found != meta:
            raise RuntimeError(
                f'{data_root} holds a synthetic dataset generated with '
                f'{found}, but {meta} was requested. Delete the folder to '
                'regenerate it, or set another data_root.'
            )
        return data_root
    if osp.exists(data_root) and os.listdir(data_root):
        raise RuntimeError(
            f'{data_root} exists and is not a synthetic dataset (no meta.json). '
            'Choose an empty or missing folder as data_root.'
        )
    parent = osp.dirname(osp.abspath(data_root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.synthetic-', dir=parent)
    try:
        for split, num in splits.items():
            _write_split(tmp, split, num, size, seed)
        with open(osp.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=1)
        if osp.isdir(data_root) and not os.listdir(data_root):
            os.rmdir(data_root)
        try:
            os.rename(tmp, data_root)
        except OSError:
            # Another process finished first; its copy is identical.
            if not osp.exists(meta_file):
                raise
    finally:
        if osp.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return data_root


@DATASETS.register_module()
class SyntheticShapesDataset(BaseSegDataset):
    """The embedded synthetic dataset, generated into ``data_root`` on first use.

    Five classes (background, disk, square, triangle, cross), RGB PNG images and
    uint8 PNG label maps in mmseg's ``img_dir``/``ann_dir`` layout.

    Args:
        generate (bool): Generate the data if ``data_root`` has none. Defaults
            to True.
        generator_cfg (dict, optional): Keyword arguments of
            :func:`generate_synthetic_dataset` (``splits``, ``size``, ``seed``).
        **kwargs: Arguments of :class:`mmseg.datasets.BaseSegDataset`.
    """

    METAINFO = dict(classes=CLASSES, palette=PALETTE)

    def __init__(
        self,
        img_suffix='.png',
        seg_map_suffix='.png',
        reduce_zero_label=False,
        generate: bool = True,
        generator_cfg: Optional[dict] = None,
        **kwargs,
    ) -> None:
        data_root = kwargs.get('data_root')
        if generate and data_root:
            generate_synthetic_dataset(data_root, **(generator_cfg or {}))
        super().__init__(
            img_suffix=img_suffix,
            seg_map_suffix=seg_map_suffix,
            reduce_zero_label=reduce_zero_label,
            **kwargs,
        )
