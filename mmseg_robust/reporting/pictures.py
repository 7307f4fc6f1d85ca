"""Adversarial examples on disk and as a picture grid.

An *example* is a dict of numpy arrays and plain values::

    {'name': str, 'image': float32 (H, W, 3) RGB in [0, 1],
     'adv_image': float32 (H, W, 3) RGB in [0, 1], 'gt': int (H', W'),
     'clean_pred': int (H', W'), 'adv_pred': int (H', W'), 'eps': float (/255),
     'attack': str, 'clean_acc': float in [0, 1], 'adv_acc': float in [0, 1]}

The label maps may have another size than the images. Only numpy, matplotlib
(without pyplot) and the standard library are used.
"""

import os
import os.path as osp
from typing import List, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = [
    'amplified_perturbation',
    'colorize',
    'image_miou',
    'load_example',
    'save_example',
    'save_picture_grid',
]

#: Keys every example has.
EXAMPLE_KEYS = (
    'name',
    'image',
    'adv_image',
    'gt',
    'clean_pred',
    'adv_pred',
    'eps',
    'attack',
    'clean_acc',
    'adv_acc',
)
_IMAGE_KEYS = ('image', 'adv_image')
_LABEL_KEYS = ('gt', 'clean_pred', 'adv_pred')
_FLOAT_KEYS = ('eps', 'clean_acc', 'adv_acc')
_STR_KEYS = ('name', 'attack')
#: Width (and, for square images, height) of one panel in inches.
PANEL_INCHES = 2.2


def _check_example(example: dict, where: str = 'example') -> None:
    if not isinstance(example, dict):
        raise ValueError(
            f'{where} should be a dict with the keys {EXAMPLE_KEYS}, '
            f'got {type(example).__name__}.'
        )
    missing = [k for k in EXAMPLE_KEYS if k not in example]
    if missing:
        raise ValueError(
            f'{where} lacks the keys {missing}; an example needs {EXAMPLE_KEYS}.'
        )
    for key in _IMAGE_KEYS:
        arr = np.asarray(example[key])
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(
                f'{where}[{key!r}] should be an (H, W, 3) RGB image '
                f'in [0, 1], got shape {arr.shape}.'
            )
    if np.shape(example['image']) != np.shape(example['adv_image']):
        raise ValueError(
            f'{where}: image {np.shape(example["image"])} and '
            f'adv_image {np.shape(example["adv_image"])} should have '
            'the same shape.'
        )
    for key in _LABEL_KEYS:
        if np.ndim(example[key]) != 2:
            raise ValueError(
                f'{where}[{key!r}] should be an (H, W) label map, got '
                f'shape {np.shape(example[key])}.'
            )


def save_example(example: dict, path: str) -> str:
    """Save an example as a compressed ``.npz``.

    Images are stored as float32 (exactly, so the ``|adv - image| <= eps/255``
    bound survives), label maps with their integer dtype and the scalar/string
    fields as 0-d arrays.

    Args:
        example (dict): the example (see the module docstring).
        path (str): output file; numpy appends ``.npz`` if it is missing.

    Returns:
        str: the path written (with ``.npz``).
    """
    _check_example(example)
    arrays = {}
    for key, value in example.items():
        if key in _IMAGE_KEYS:
            arrays[key] = np.asarray(value, dtype=np.float32)
        elif key in _LABEL_KEYS:
            value = np.asarray(value)
            if not np.issubdtype(value.dtype, np.integer):
                raise ValueError(
                    f'example[{key!r}] should hold integer labels, got '
                    f'dtype {value.dtype}; cast it with .astype(int).'
                )
            arrays[key] = value
        elif key in _FLOAT_KEYS:
            arrays[key] = np.asarray(float(value), dtype=np.float64)
        elif key in _STR_KEYS:
            arrays[key] = np.asarray(str(value))
        else:
            value = np.asarray(value)
            if value.dtype == object:
                raise ValueError(
                    f'example[{key!r}] cannot be stored without '
                    'pickling; use arrays, numbers or strings.'
                )
            arrays[key] = value
    path = os.fspath(path)
    if not path.endswith('.npz'):
        path += '.npz'
    folder = osp.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def load_example(path: str) -> dict:
    """Load an example saved by :func:`save_example`.

    Args:
        path (str): the ``.npz`` file.

    Returns:
        dict: the example, with numpy arrays for the images and label maps and
        python ``float``/``str`` for the scalar fields.
    """
    with np.load(path, allow_pickle=False) as data:
        example = {}
        for key in data.files:
            value = data[key]
            example[key] = value.item() if value.ndim == 0 else value
    for key in _FLOAT_KEYS:
        if key in example:
            example[key] = float(example[key])
    for key in _STR_KEYS:
        if key in example:
            example[key] = str(example[key])
    return example


def colorize(
    labels: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255
) -> np.ndarray:
    """Colour a label map.

    Args:
        labels (np.ndarray): (H, W) integer labels.
        palette (sequence): RGB triples (0-255), one per class (at least as many
            as classes).
        ignore_index (int): label drawn black.

    Returns:
        np.ndarray: uint8 (H, W, 3) image.
    """
    labels = np.asarray(labels)
    pal = np.asarray(palette)
    if pal.ndim != 2 or pal.shape[1] != 3 or len(pal) == 0:
        raise ValueError(
            f'palette should be a non-empty list of RGB triples, got shape {pal.shape}.'
        )
    pal = np.clip(pal, 0, 255).astype(np.uint8)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f'labels should be integers, got dtype {labels.dtype}.')
    labels = labels.astype(np.int64)
    valid = labels != ignore_index
    if valid.any():
        lo, hi = int(labels[valid].min()), int(labels[valid].max())
        if hi >= len(pal) or lo < 0:
            bad = hi if hi >= len(pal) else lo
            raise ValueError(
                f'label {bad} is outside the palette of {len(pal)} '
                f'colours (max label {hi}); pass a palette with a '
                'colour per class or set ignore_index '
                f'(now {ignore_index}).'
            )
    out = np.zeros(labels.shape + (3,), dtype=np.uint8)
    out[valid] = pal[labels[valid]]
    return out


def amplified_perturbation(
    image: np.ndarray, adv_image: np.ndarray, eps: float
) -> np.ndarray:
    """The perturbation ``adv - image`` scaled so ``±eps/255`` spans [0, 1].

    Args:
        image (np.ndarray): clean image in [0, 1].
        adv_image (np.ndarray): adversarial image in [0, 1], same shape.
        eps (float): radius in /255 units.

    Returns:
        np.ndarray: float32 ``0.5 + (adv - image) * (255 / eps) / 2`` clipped to
        [0, 1] (all 0.5 if ``eps <= 0``).
    """
    image = np.asarray(image, dtype=np.float32)
    adv_image = np.asarray(adv_image, dtype=np.float32)
    if image.shape != adv_image.shape:
        raise ValueError(
            f'image {image.shape} and adv_image {adv_image.shape} '
            'should have the same shape.'
        )
    eps = float(eps)
    if not eps > 0:
        return np.full(image.shape, 0.5, dtype=np.float32)
    out = 0.5 + (adv_image - image) * np.float32(255.0 / eps / 2.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def image_miou(gt: np.ndarray, pred: np.ndarray, ignore_index: int = 255) -> float:
    """One image's mIoU: the mean IoU over the classes present in its ground
    truth or its prediction (pixels labelled ``ignore_index`` left out).

    Pixel accuracy alone can hide a whole object: on an image that is 80 %
    background, predicting the object as another class still scores 80 %
    accuracy, but an IoU of 0 for both the object's class and the class
    predicted there.

    Args:
        gt (np.ndarray): (H, W) integer ground truth.
        pred (np.ndarray): (H, W) integer prediction, same shape.
        ignore_index (int): label of the pixels left out.

    Returns:
        float: mIoU in [0, 1]; NaN if the image has no labelled pixel.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(
            f'ground truth {gt.shape} and prediction {pred.shape} should have '
            'the same shape.'
        )
    valid = gt != ignore_index
    if not valid.any():
        return float('nan')
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    ious = []
    for c in np.union1d(np.unique(g), np.unique(p)):
        inter = np.count_nonzero((g == c) & (p == c))
        union = np.count_nonzero((g == c) | (p == c))
        ious.append(inter / union)
    return float(np.mean(ious))


def _pct_text(value: float) -> str:
    return f'{100 * value:.0f}%' if np.isfinite(value) else '-'


#: Caption under a picture grid: how to read the perturbation panel.
PERTURBATION_KEY = (
    'Perturbation: grey = pixel unchanged; per colour channel, brighter = '
    'raised, darker = lowered, ±ε/255 spans black to white (so a red pixel had '
    'its red raised or its green and blue lowered).'
)


def _amplification(eps: float) -> Optional[float]:
    return 255.0 / (2.0 * eps) if eps > 0 else None


def _column_titles(example: dict, ignore_index: int = 255) -> List[str]:
    eps = float(example['eps'])
    gt = example['gt']
    clean_miou = _pct_text(image_miou(gt, example['clean_pred'], ignore_index))
    adv_miou = _pct_text(image_miou(gt, example['adv_pred'], ignore_index))
    amp = _amplification(eps)
    perturbation = (
        f'perturbation ×{amp:.3g}' if amp is not None else 'perturbation (ε=0)'
    )
    return [
        'clean image',
        f'adversarial (ε={eps:g}/255)',
        perturbation,
        'ground truth',
        'clean prediction\n'
        f'mIoU {clean_miou}, acc {100 * float(example["clean_acc"]):.0f}%',
        'adversarial prediction\n'
        f'mIoU {adv_miou}, acc {100 * float(example["adv_acc"]):.0f}%',
    ]


def _present_classes(
    examples: Sequence[dict], num: int, ignore_index: int
) -> List[int]:
    present = set()
    for ex in examples:
        for key in _LABEL_KEYS:
            present.update(np.unique(np.asarray(ex[key])).tolist())
    present.discard(ignore_index)
    return sorted(c for c in present if 0 <= c < num)


def _grid_figure(
    examples: Sequence[dict],
    palette: Sequence[Sequence[int]],
    title: Optional[str] = None,
    class_names: Optional[Sequence[str]] = None,
    ignore_index: int = 255,
) -> Figure:
    """The picture-grid figure (not saved); see :func:`save_picture_grid`."""
    if isinstance(examples, dict):
        examples = [examples]
    examples = list(examples)
    if not examples:
        raise ValueError('No examples given: pass a list of example dicts.')
    for i, ex in enumerate(examples):
        _check_example(ex, f'examples[{i}]')
    if class_names is not None and len(class_names) < len(palette):
        raise ValueError(
            f'{len(class_names)} class_names for a palette of '
            f'{len(palette)} colours: pass a name per class.'
        )
    n = len(examples)
    # panel height follows the images' aspect ratio (bounded for extreme ones)
    aspect = max(
        np.shape(ex['image'])[0] / max(np.shape(ex['image'])[1], 1) for ex in examples
    )
    panel_w = PANEL_INCHES
    panel_h = PANEL_INCHES * float(np.clip(aspect, 0.3, 1.5))
    title_h = 0.5  # per-row panel titles (two lines)
    top = 0.55 if title else 0.1
    legend_h = 0.0
    classes = []
    if class_names is not None:
        classes = _present_classes(examples, len(palette), ignore_index)
        legend_h = 0.25 + 0.25 * int(np.ceil(len(classes) / 6)) if classes else 0
    key_h = 0.3  # the perturbation key
    left, right = 0.35, 0.1
    width = left + right + 6 * panel_w + 5 * 0.1
    height = top + n * (panel_h + title_h) + legend_h + key_h + 0.1
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        top=1 - (top + title_h) / height,
        bottom=(legend_h + key_h + 0.1) / height,
        wspace=0.1 / panel_w,
        hspace=title_h / panel_h,
    )
    axes = fig.subplots(n, 6, squeeze=False)
    for r, ex in enumerate(examples):
        eps = float(ex['eps'])
        panels = [
            np.clip(np.asarray(ex['image'], np.float32), 0, 1),
            np.clip(np.asarray(ex['adv_image'], np.float32), 0, 1),
            amplified_perturbation(ex['image'], ex['adv_image'], eps),
            colorize(ex['gt'], palette, ignore_index),
            colorize(ex['clean_pred'], palette, ignore_index),
            colorize(ex['adv_pred'], palette, ignore_index),
        ]
        titles = _column_titles(ex, ignore_index)
        for c, (ax, img, text) in enumerate(zip(axes[r], panels, titles)):
            ax.imshow(img, interpolation='nearest' if c >= 3 else 'antialiased')
            ax.set_title(text, fontsize=8.5)
            if c == 0:
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_ylabel(f'{ex["name"]}\n{ex["attack"]}', fontsize=8)
            else:
                ax.axis('off')
    if title:
        fig.suptitle(title, y=1 - 0.3 / height, fontsize=12)
    fig.text(
        0.5,
        (legend_h + 0.1 + key_h / 2) / height,
        PERTURBATION_KEY,
        ha='center',
        va='center',
        fontsize=8,
        wrap=True,
    )
    if classes:
        pal = np.clip(np.asarray(palette), 0, 255) / 255.0
        handles = [
            Patch(
                facecolor=pal[c],
                edgecolor='black',
                linewidth=0.5,
                label=str(class_names[c]),
            )
            for c in classes
        ]
        fig.legend(
            handles=handles,
            loc='lower center',
            ncol=min(6, len(classes)),
            fontsize=8,
            frameon=False,
            bbox_to_anchor=(0.5, 0.05 / height),
        )
    return fig


def save_picture_grid(
    examples: Sequence[dict],
    out_file: str,
    palette: Sequence[Sequence[int]],
    title: Optional[str] = None,
    class_names: Optional[Sequence[str]] = None,
) -> str:
    """Save a grid with one row per example and six columns.

    The columns are the clean image, the adversarial image, the amplified
    perturbation (``±eps/255`` spans black to white, grey is unchanged; a key
    under the grid says so), the ground truth and the clean and adversarial
    predictions with their per-image mIoU (:func:`image_miou`) and pixel
    accuracy: accuracy alone hides an object predicted as another class on an
    image that is mostly background. The example's name (and attack) label
    each row.

    Args:
        examples (sequence of dict): examples (see the module docstring).
        out_file (str): path of the PNG to write (its folder is created).
        palette (sequence): RGB triples (0-255), one per class.
        title (str, optional): figure title.
        class_names (sequence of str, optional): class names; if given, a colour
            key of the classes present in the label maps is drawn below the grid.

    Returns:
        str: ``out_file``.
    """
    fig = _grid_figure(examples, palette, title=title, class_names=class_names)
    folder = osp.dirname(os.fspath(out_file))
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(out_file, dpi=100)
    return os.fspath(out_file)
