"""Miniature, deterministic copies of real dataset layouts (a test fixture).

Each ``make_mini_*`` function writes a handful of generated images and labels in
exactly the folder layout, file names, file formats and label encodings that the
official archives plus mmseg 1.2.2's dataset converters produce, and returns the
``data_root`` that the mmseg / mmseg_robust configs expect:

- :func:`make_mini_voc`: PASCAL VOC 2012 + SBD after
  ``tools/dataset_converters/voc_aug.py`` (``.../VOCdevkit/VOC2012``);
- :func:`make_mini_ade20k`: ADE20K SceneParsing (``.../ade/ADEChallengeData2016``);
- :func:`make_mini_cityscapes`: Cityscapes after
  ``tools/dataset_converters/cityscapes.py`` (``.../cityscapes``).

The images are smooth colour fields ("stuff" bands) with a few textured shapes
whose colour, texture and outline depend on their class, and the labels match the
drawn shapes, so a model could in principle learn them. Sizes vary, some below
and some above the training crops. Everything depends only on the seed (numpy +
PIL, no global random state) and takes well under a second.

The images of every dataset and split are listed in :data:`VOC_IMAGES`,
:data:`ADE20K_IMAGES` and :data:`CITYSCAPES_IMAGES` (name -> (width, height));
the expected counts in :data:`VOC_COUNTS`, :data:`ADE20K_COUNTS` and
:data:`CITYSCAPES_COUNTS`.
"""

import os
import os.path as osp
import zlib

import numpy as np
from PIL import Image

__all__ = [
    'ADE20K_COUNTS',
    'ADE20K_IMAGES',
    'CITYSCAPES_COUNTS',
    'CITYSCAPES_IMAGES',
    'VOC_COUNTS',
    'VOC_IDS',
    'VOC_IMAGES',
    'make_mini_ade20k',
    'make_mini_cityscapes',
    'make_mini_voc',
    'voc_palette',
]

# --------------------------------------------------------------------------------
# PASCAL VOC 2012 + SBD
# --------------------------------------------------------------------------------
# VOC train ids T, VOC val ids V and SBD ids S (SBD's train + val lists). As in the
# real data S overlaps both T and V, and some T ids are not in S (those have no
# SegmentationClassAug file).
_VOC_TRAIN = [
    '2007_000032',
    '2007_000039',
    '2007_000063',
    '2008_000008',
    '2008_000015',
    '2009_000012',
]
_VOC_VAL = ['2007_000033', '2007_000042', '2008_000009', '2009_000013']
_SBD_ONLY = ['2008_000123', '2008_000131', '2009_000201', '2010_000045', '2011_000003']
_SBD = sorted(
    ['2007_000032', '2008_000008', '2009_000012']
    + ['2007_000033', '2008_000009']
    + _SBD_ONLY
)
# Exactly what voc_aug.py computes (it writes Python set order; sorted here).
_VOC_TRAINAUG = sorted(set(_VOC_TRAIN + _SBD) - set(_VOC_VAL))
_VOC_AUG = sorted(set(_SBD) - set(_VOC_TRAIN + _VOC_VAL))
VOC_IDS = dict(
    train=list(_VOC_TRAIN),
    val=list(_VOC_VAL),
    sbd=list(_SBD),
    aug=list(_VOC_AUG),
    trainaug=list(_VOC_TRAINAUG),
)
VOC_COUNTS = dict(train=6, val=4, sbd=10, aug=5, trainaug=11)
assert {k: len(v) for k, v in VOC_IDS.items()} == VOC_COUNTS

# (width, height): VOC images have a long side of at most 500; every split gets
# sizes below and above the 473 crop, landscape and portrait.
_VOC_SIZES = [(500, 375), (375, 500), (500, 333), (300, 200), (180, 240)]
_VOC_ALL = sorted(set(_VOC_TRAIN + _VOC_VAL + _SBD))
VOC_IMAGES = dict(
    [(img_id, _VOC_SIZES[i % 5]) for i, img_id in enumerate(_VOC_TRAIN)]
    + [(img_id, _VOC_SIZES[(i + 2) % 5]) for i, img_id in enumerate(_VOC_VAL)]
    + [(img_id, _VOC_SIZES[(i + 1) % 5]) for i, img_id in enumerate(_SBD_ONLY)]
)
assert sorted(VOC_IMAGES) == _VOC_ALL

# --------------------------------------------------------------------------------
# ADE20K
# --------------------------------------------------------------------------------
_ADE_SIZES = dict(
    training=[(683, 512), (512, 768), (400, 300), (256, 341), (600, 450)],
    validation=[(512, 683), (341, 256), (640, 480)],
)
ADE20K_IMAGES = {
    split: {
        f'ADE_{"train" if split == "training" else "val"}_{i + 1:08d}': size
        for i, size in enumerate(sizes)
    }
    for split, sizes in _ADE_SIZES.items()
}
ADE20K_COUNTS = dict(training=5, validation=3)

# --------------------------------------------------------------------------------
# Cityscapes
# --------------------------------------------------------------------------------
_CITYSCAPES_SIZES = dict(
    train=[
        ('aachen', 0, 19, (512, 256)),
        ('aachen', 1, 19, (640, 320)),
        ('bochum', 0, 313, (384, 192)),
        ('bochum', 0, 1097, (1024, 512)),
    ],
    val=[
        ('frankfurt', 0, 294, (512, 256)),
        ('lindau', 0, 19, (768, 384)),
        ('lindau', 1, 19, (384, 192)),
    ],
)
CITYSCAPES_IMAGES = {
    split: {
        f'{city}/{city}_{seq:06d}_{frame:06d}': size
        for city, seq, frame, size in entries
    }
    for split, entries in _CITYSCAPES_SIZES.items()
}
CITYSCAPES_COUNTS = dict(train=4, val=3)

# Cityscapes labelId of every trainId (0..18), for the optional labelIds files.
_CITYSCAPES_LABEL_IDS = [
    7,
    8,
    11,
    12,
    13,
    17,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    26,
    27,
    28,
    31,
    32,
    33,
]
_JPEG_QUALITY = 90


def voc_palette():
    """The 256-entry PASCAL VOC colour map (flat list of 768 ints)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


# --------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------
def _rng(seed, name):
    """A generator that depends only on ``seed`` and the sample's name."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _class_style(dataset, cls):
    """Fixed colour, second colour, texture and outline of a class."""
    g = np.random.default_rng([zlib.crc32(dataset.encode()), cls])
    colour = g.integers(30, 226, 3).astype(np.float32)
    colour2 = np.clip(colour + g.integers(-90, 91, 3), 0, 255).astype(np.float32)
    return dict(
        colour=colour,
        colour2=colour2,
        texture=int(cls % 4),
        period=float(5 + (cls * 7) % 13),
        angle=float(np.deg2rad((cls * 37) % 180)),
        shape=int((cls // 4) % 3),
    )


def _smooth_field(rng, h, w, grid=4, amplitude=40.0):
    """A smooth random (h, w, 3) offset field: a small grid, bilinearly upsampled."""
    small = rng.uniform(0, 255, (grid, grid, 3)).astype(np.uint8)
    field = np.asarray(
        Image.fromarray(small).resize((w, h), Image.BILINEAR), np.float32
    )
    return (field / 255.0 - 0.5) * 2 * amplitude


def _texture(style, yy, xx):
    """Values in [0, 1] of a class's texture at the coordinates ``yy``, ``xx``."""
    kind, period = style['texture'], style['period']
    if kind == 0:  # stripes at a class-dependent angle
        u = xx * np.cos(style['angle']) + yy * np.sin(style['angle'])
        return 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    if kind == 1:  # checkerboard
        return ((xx // period + yy // period) % 2).astype(np.float32)
    if kind == 2:  # dots
        return (
            (np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)) > 0.4
        ).astype(np.float32)
    return np.zeros_like(xx + yy, np.float32)  # plain


def _paint(img, mask, style, y0, x0, rng, strength=1.0):
    """Paint a class's texture into ``img[y0:, x0:]`` where ``mask`` is set."""
    h, w = mask.shape
    t = (
        _texture(
            style,
            np.arange(y0, y0 + h, dtype=np.float32)[:, None],
            np.arange(x0, x0 + w, dtype=np.float32)[None, :],
        )
        * strength
    )
    jitter = rng.uniform(-15, 15, 3).astype(np.float32)
    colour = (
        style['colour'] + jitter + (style['colour2'] - style['colour']) * t[..., None]
    )
    np.copyto(img[y0 : y0 + h, x0 : x0 + w], colour, where=mask[..., None])


def _shape_mask(kind, h, w, cy, cx, ry, rx):
    """Mask of an ellipse / rectangle / diamond; returns (mask, y0, x0)."""
    y0, y1 = max(0, int(cy - ry)), min(h, int(cy + ry) + 1)
    x0, x1 = max(0, int(cx - rx)), min(w, int(cx + rx) + 1)
    yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / ry
    xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / rx
    if kind == 0:
        mask = yy**2 + xx**2 <= 1
    elif kind == 1:
        mask = (np.abs(yy) <= 0.8) & (np.abs(xx) <= 0.9)
    else:
        mask = np.abs(yy) + np.abs(xx) <= 1
    return mask, y0, x0


def _boundary(label, width):
    """Pixels within ``width`` of a change of label (4-neighbourhood edges)."""
    edge = np.zeros(label.shape, bool)
    dy = label[1:] != label[:-1]
    dx = label[:, 1:] != label[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    for _ in range(width - 1):
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:-1] |= edge[1:]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    return edge


def _render(dataset, rng, size, stuff, things, num_things, noise=4.0):
    """Render one image and its label.

    Args:
        dataset (str): Name that fixes the classes' styles.
        rng (np.random.Generator): The sample's generator.
        size (tuple[int, int]): (width, height).
        stuff (list[int]): Classes of the background bands, top to bottom.
        things (list[int]): Classes to draw shapes of.
        num_things (int): Number of shapes.
        noise (float): Standard deviation of the pixel noise.

    Returns:
        tuple[np.ndarray, np.ndarray, np.ndarray]: RGB uint8 (h, w, 3) image,
        uint8 (h, w) label and bool (h, w) mask of the pixels of shapes.
    """
    w, h = size
    img = np.empty((h, w, 3), np.float32)
    label = np.empty((h, w), np.uint8)
    # Background: horizontal bands of "stuff" with wavy borders.
    xs = np.arange(w, dtype=np.float32)
    rows = np.arange(h, dtype=np.float32)[:, None]
    band = np.zeros((h, w), np.int64)
    for k in range(1, len(stuff)):
        base = h * (k / len(stuff) + rng.uniform(-0.08, 0.08))
        wave = base + h * 0.04 * np.sin(
            2 * np.pi * xs / rng.uniform(0.3, 1.2) / w + rng.uniform(0, 2 * np.pi)
        )
        band += rows >= wave[None, :]
    for k, cls in enumerate(stuff):
        mask = band == k
        ys = np.nonzero(mask.any(1))[0]
        if len(ys):
            y0, y1 = ys[0], ys[-1] + 1
            _paint(img, mask[y0:y1], _class_style(dataset, cls), y0, 0, rng, 0.3)
            label[mask] = cls
    img += _smooth_field(rng, h, w)
    # Things: class-dependent shapes and textures, painted back to front.
    objects = np.zeros((h, w), bool)
    for _ in range(num_things):
        cls = int(things[rng.integers(len(things))])
        style = _class_style(dataset, cls)
        ry = rng.uniform(0.08, 0.3) * h
        rx = rng.uniform(0.08, 0.3) * w
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        mask, y0, x0 = _shape_mask(style['shape'], h, w, cy, cx, ry, rx)
        if not mask.any():
            continue
        _paint(img, mask, style, y0, x0, rng)
        region = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
        label[region][mask] = cls
        objects[region] |= mask
    if noise:
        img += noise * rng.standard_normal(img.shape, np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), label, objects


def _save(array, path, mode=None, palette=None, **kwargs):
    os.makedirs(osp.dirname(path), exist_ok=True)
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    if palette is not None:
        image.putpalette(palette)
    image.save(path, **kwargs)


def _write_list(path, names):
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.writelines(name + '\n' for name in names)


# --------------------------------------------------------------------------------
# The datasets
# --------------------------------------------------------------------------------
def make_mini_voc(root, seed=0):
    """Write a miniature PASCAL VOC 2012 + SBD ("aug") under ``root``.

    The layout ``tools/dataset_converters/voc_aug.py`` leaves: ``JPEGImages``
    (every listed id), ``SegmentationClass`` (VOC's own labels of the train and
    val ids: palette PNGs, 0..20 with 255 on object boundaries),
    ``SegmentationClassAug`` (the SBD ids only: 'L' PNGs, 0..20) and
    ``ImageSets/Segmentation/{train,val,aug,trainaug}.txt`` (see
    :data:`VOC_IDS`).

    Args:
        root (str): Folder to write ``VOCdevkit/VOC2012`` into.
        seed (int): Seed of the generated content.

    Returns:
        str: The data root, ``<root>/VOCdevkit/VOC2012``.
    """
    data_root = osp.join(root, 'VOCdevkit', 'VOC2012')
    palette = voc_palette()
    voc_ids = set(_VOC_TRAIN + _VOC_VAL)
    for img_id in _VOC_ALL:
        rng = _rng(seed, img_id)
        things = rng.choice(np.arange(1, 21), 3, replace=False)
        img, label, objects = _render(
            'voc', rng, VOC_IMAGES[img_id], [0], things, int(rng.integers(3, 6))
        )
        _save(
            img,
            osp.join(data_root, 'JPEGImages', img_id + '.jpg'),
            quality=_JPEG_QUALITY,
        )
        if img_id in voc_ids:
            # VOC's annotation: a void band ~5 px wide around every object.
            void = _boundary(label, 3) & (_boundary(objects, 3) | objects)
            _save(
                np.where(void, 255, label).astype(np.uint8),
                osp.join(data_root, 'SegmentationClass', img_id + '.png'),
                'P',
                palette,
            )
        if img_id in _SBD:
            # SBD's annotation (GTcls.Segmentation), as voc_aug.py writes it.
            _save(
                label, osp.join(data_root, 'SegmentationClassAug', img_id + '.png'), 'L'
            )
    sets = osp.join(data_root, 'ImageSets', 'Segmentation')
    for name in ('train', 'val', 'aug', 'trainaug'):
        _write_list(osp.join(sets, name + '.txt'), VOC_IDS[name])
    return data_root


# "Stuff" (bands) and "thing" classes of ADE20K's raw 0..150 labels.
_ADE_STUFF = [1, 2, 3, 4, 5, 6, 7, 10, 12, 14, 17, 22, 27]
_ADE_THINGS = [c for c in range(8, 151) if c not in _ADE_STUFF]


def make_mini_ade20k(root, seed=0):
    """Write a miniature ADE20K SceneParsing (ADEChallengeData2016) under ``root``.

    ``images/{training,validation}/ADE_{train,val}_%08d.jpg`` and
    ``annotations/.../ADE_..._%08d.png`` ('L' PNGs with the raw labels 0..150,
    0 = "other" on the thin gaps around some objects, no 255).

    Args:
        root (str): Folder to write ``ade/ADEChallengeData2016`` into.
        seed (int): Seed of the generated content.

    Returns:
        str: The data root, ``<root>/ade/ADEChallengeData2016``.
    """
    data_root = osp.join(root, 'ade', 'ADEChallengeData2016')
    for split, images in ADE20K_IMAGES.items():
        for name, size in images.items():
            rng = _rng(seed, name)
            stuff = list(rng.choice(_ADE_STUFF, 3, replace=False))
            things = rng.choice(_ADE_THINGS, 4, replace=False)
            img, label, objects = _render(
                'ade', rng, size, stuff, things, int(rng.integers(3, 7))
            )
            # Unlabelled ("other", 0) gaps along the outline of the objects.
            label[_boundary(objects, 1) & ~objects] = 0
            _save(
                img,
                osp.join(data_root, 'images', split, name + '.jpg'),
                quality=_JPEG_QUALITY,
            )
            _save(label, osp.join(data_root, 'annotations', split, name + '.png'), 'L')
    return data_root


# Cityscapes train ids: sky, building / vegetation / wall, road / sidewalk bands;
# fence, poles, lights, signs, terrain, people and vehicles as things.
_CS_STUFF = [[10], [2, 8, 3], [0, 1]]
_CS_THINGS = [4, 5, 6, 7, 9, 11, 12, 13, 14, 15, 16, 17, 18]


def make_mini_cityscapes(root, seed=0):
    """Write a miniature Cityscapes (fine annotations, converted) under ``root``.

    ``leftImg8bit/{train,val}/<city>/<city>_%06d_%06d_leftImg8bit.png`` and, as
    ``tools/dataset_converters/cityscapes.py`` produces them,
    ``gtFine/.../<city>_..._gtFine_labelTrainIds.png`` ('L' PNGs, train ids
    0..18 and 255 on the ego vehicle and the rectification border) and the
    ``{train,val}.txt`` lists; ``_gtFine_labelIds.png`` too.

    Args:
        root (str): Folder to write ``cityscapes`` into.
        seed (int): Seed of the generated content.

    Returns:
        str: The data root, ``<root>/cityscapes``.
    """
    data_root = osp.join(root, 'cityscapes')
    label_ids = np.zeros(256, np.uint8)
    label_ids[:19] = _CITYSCAPES_LABEL_IDS
    for split, images in CITYSCAPES_IMAGES.items():
        for name, size in images.items():
            rng = _rng(seed, name)
            stuff = [int(rng.choice(options)) for options in _CS_STUFF]
            things = rng.choice(_CS_THINGS, 4, replace=False)
            img, label, _ = _render(
                'cityscapes', rng, size, stuff, things, int(rng.integers(4, 8)), noise=0
            )
            w, h = size
            # Ego vehicle (a bonnet at the bottom) and rectification border.
            xs = np.arange(w) / w - 0.5
            hood = h * (0.92 - 0.05 * np.cos(np.pi * xs))
            ego = np.arange(h)[:, None] >= hood[None, :]
            img[ego] = (40, 40, 45)
            label[ego] = 255
            border = max(1, w // 256)
            label[:, :border] = 255
            label[:, -border:] = 255
            stem = osp.join(split, name)
            _save(img, osp.join(data_root, 'leftImg8bit', stem + '_leftImg8bit.png'))
            _save(
                label,
                osp.join(data_root, 'gtFine', stem + '_gtFine_labelTrainIds.png'),
                'L',
            )
            ids = label_ids[label]
            ids[ego] = 1  # "ego vehicle"
            ids[:, :border] = ids[:, -border:] = 2  # "rectification border"
            _save(
                ids, osp.join(data_root, 'gtFine', stem + '_gtFine_labelIds.png'), 'L'
            )
        _write_list(osp.join(data_root, f'{split}.txt'), list(images))
    return data_root
