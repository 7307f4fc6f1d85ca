"""Common corruptions of images (Hendrycks & Dietterich, ICLR 2019), applied as
the segmentation benchmarks of Kamann & Rother (CVPR 2020) and mmdet's
``test_robustness.py`` apply them: to the image as loaded, before the test
pipeline resizes it (docs/algorithms.md section 8).

The corruption functions are those of the ``imagecorruptions`` package, in its
maintained fork ``imagecorruptions-imaug`` (``pip install
mmseg_robust[corruptions]``), which runs on current numpy and scikit-image. Every
corruption is made reproducible here: the global numpy generator is seeded
(and restored afterwards) and the two corruptions with a generator of their own
(``impulse_noise``: scikit-image's, ``glass_blur``: numba's) get the seed as an
argument. The seed (:func:`corruption_seed`) depends on the run seed, the
image's file name, the corruption and the severity only, so an image is
corrupted the same way in any batch, process, resumed run and in the
pre-generated sets of ``tools/dataset_converters/make_corrupted.py``.

- :data:`CORRUPTIONS`: the 19 names in the package's order; :data:`CATEGORIES`:
  ``noise``, ``blur``, ``weather``, ``digital`` (the 15 benchmark corruptions)
  and ``holdout`` (the 4 held-out ones, the package's "validation" set);
- :func:`resolve_corruptions`: ``'benchmark'``, ``'all'``, a category or names
  -> names;
- :func:`corrupt_image`: one corrupted copy of a BGR (mmcv) or RGB image;
- :class:`Corrupt`: the transform, put right after ``LoadImageFromFile``.
"""

import hashlib
import os.path as osp
from typing import Dict, List, Sequence, Union

import numpy as np
from mmcv.transforms import BaseTransform

from mmseg_robust.registry import TRANSFORMS

__all__ = [
    'BENCHMARK_CORRUPTIONS',
    'CATEGORIES',
    'CORRUPTIONS',
    'Corrupt',
    'SEVERITIES',
    'category_of',
    'corrupt_image',
    'corruption_library_versions',
    'corruption_package',
    'corruption_seed',
    'resolve_corruptions',
    'resolve_severities',
    'with_corruption',
]

#: The corruptions by category, in the order of ``imagecorruptions``.
CATEGORIES: Dict[str, List[str]] = {
    'noise': ['gaussian_noise', 'shot_noise', 'impulse_noise'],
    'blur': ['defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur'],
    'weather': ['snow', 'frost', 'fog', 'brightness'],
    'digital': ['contrast', 'elastic_transform', 'pixelate', 'jpeg_compression'],
    'holdout': ['speckle_noise', 'gaussian_blur', 'spatter', 'saturate'],
}
#: The 15 benchmark corruptions (mPC is their mean).
BENCHMARK_CORRUPTIONS: List[str] = [
    c for k in ('noise', 'blur', 'weather', 'digital') for c in CATEGORIES[k]
]
#: All 19 (the benchmark ones, then the 4 held-out ones).
CORRUPTIONS: List[str] = BENCHMARK_CORRUPTIONS + CATEGORIES['holdout']
SEVERITIES = (1, 2, 3, 4, 5)
_SEEDED_BY_ARGUMENT = ('impulse_noise', 'glass_blur')
_EXTRA_HINT = (
    "pip install 'mmseg_robust[corruptions]' (or pip install "
    'imagecorruptions-imaug, the maintained fork of imagecorruptions)'
)


def category_of(name: str) -> str:
    """The category of corruption ``name``."""
    for category, names in CATEGORIES.items():
        if name in names:
            return category
    raise ValueError(f'unknown corruption {name!r}; choose from {CORRUPTIONS}')


def resolve_corruptions(spec: Union[str, Sequence[str]]) -> List[str]:
    """Corruption names from ``spec``: ``'benchmark'`` (the 15), ``'all'`` (19),
    a category (``'noise'``, ``'blur'``, ``'weather'``, ``'digital'``,
    ``'holdout'``), a name, or a list of those (comma-separated text too);
    duplicates dropped, the package's order kept."""
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(',') if s.strip()]
    else:
        items = [str(s).strip() for s in spec]
    if not items:
        raise ValueError(
            'no corruption given: pass benchmark, all, a category '
            f'{sorted(CATEGORIES)} or names from {CORRUPTIONS}'
        )
    chosen = set()
    for item in items:
        if item == 'benchmark':
            chosen.update(BENCHMARK_CORRUPTIONS)
        elif item == 'all':
            chosen.update(CORRUPTIONS)
        elif item in CATEGORIES:
            chosen.update(CATEGORIES[item])
        elif item in CORRUPTIONS:
            chosen.add(item)
        else:
            raise ValueError(
                f'unknown corruption {item!r}: pass benchmark (the 15), all (19), '
                f'a category {sorted(CATEGORIES)} or names from {CORRUPTIONS}'
            )
    return [c for c in CORRUPTIONS if c in chosen]


def resolve_severities(spec: Union[int, str, Sequence[int]]) -> List[int]:
    """Severities in 1..5 (sorted, unique) from an int, a list or ``'1,3'``."""
    if isinstance(spec, (int, np.integer)):
        items = [spec]
    elif isinstance(spec, str):
        items = [s for s in spec.replace(' ', '').split(',') if s]
    else:
        items = list(spec)
    try:
        values = sorted({_integer(s) for s in items})
    except (TypeError, ValueError):
        raise ValueError(f'severities must be integers in 1..5, got {spec!r}') from None
    if not values or any(s not in SEVERITIES for s in values):
        raise ValueError(f'severities must be integers in 1..5, got {spec!r}')
    return values


def _integer(value) -> int:
    """``value`` as an int: an integer, a whole float or integer text (not
    ``1.5`` or a bool, which ``int`` would turn into another severity)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(value)
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise ValueError(value)
    return int(value)


def corruption_seed(seed: int, image: str, corruption: str, severity: int) -> int:
    """The seed of one corrupted image: from the run seed, the image's file
    name (not its folder: the same across data roots and machines), the
    corruption and the severity (BLAKE2b, 32 bits)."""
    text = f'{int(seed)}|{osp.basename(str(image))}|{corruption}|{int(severity)}'
    digest = hashlib.blake2b(text.encode(), digest_size=4).digest()
    return int.from_bytes(digest, 'little')


def corruption_package():
    """The ``imagecorruptions`` module, or an ImportError naming the extra."""
    try:
        import imagecorruptions
    except ImportError as e:
        raise ImportError(
            f'common corruptions need the imagecorruptions package ({e}): '
            + _EXTRA_HINT
        ) from None
    return imagecorruptions


def corrupt_image(
    img: np.ndarray,
    corruption: str,
    severity: int,
    seed: int,
    channel_order: str = 'bgr',
) -> np.ndarray:
    """One corrupted copy of ``img`` (uint8, HxWx3 or HxW), reproducible.

    Args:
        img (np.ndarray): the image as loaded (uint8; mmcv loads BGR).
        corruption (str): one of :data:`CORRUPTIONS`.
        severity (int): 1..5.
        seed (int): the image's seed (:func:`corruption_seed`).
        channel_order (str): ``'bgr'`` (mmcv's) or ``'rgb'``; the package
            corrupts RGB images (frost, snow and saturate are colour
            dependent), the result is returned in the same order.

    Returns:
        np.ndarray: uint8, the shape of ``img``.
    """
    package = corruption_package()
    if corruption not in CORRUPTIONS:
        raise ValueError(
            f'unknown corruption {corruption!r}; choose from {CORRUPTIONS}'
        )
    if severity not in SEVERITIES:
        raise ValueError(f'severity must be in 1..5, got {severity!r}')
    if img.dtype != np.uint8:
        raise ValueError(
            f'corruptions apply to uint8 images as loaded, got {img.dtype}: put '
            'Corrupt right after LoadImageFromFile (without to_float32=True)'
        )
    if channel_order not in ('bgr', 'rgb'):
        raise ValueError(f"channel_order must be 'bgr' or 'rgb', got {channel_order!r}")
    gray = img.ndim == 2
    if gray:
        rgb = np.repeat(img[..., None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 3:
        rgb = img[..., ::-1] if channel_order == 'bgr' else img
    else:
        raise ValueError(
            f'corruptions apply to HxW or HxWx3 images, got shape {img.shape}'
        )
    if min(rgb.shape[:2]) < 32:
        raise ValueError(
            f'the corruptions need images of at least 32x32 pixels, got '
            f'{rgb.shape[1]}x{rgb.shape[0]}'
        )
    kwargs = dict(seed=int(seed)) if corruption in _SEEDED_BY_ARGUMENT else {}
    state = np.random.get_state()
    np.random.seed(int(seed) % 2**32)
    try:
        out = package.corrupt(
            np.ascontiguousarray(rgb),
            severity=int(severity),
            corruption_name=corruption,
            **kwargs,
        )
    finally:
        np.random.set_state(state)
    if out.shape != rgb.shape:
        raise RuntimeError(
            f'{corruption} returned an image of shape {out.shape} for one of '
            f'{rgb.shape}; update imagecorruptions-imaug'
        )
    if gray:
        return np.ascontiguousarray(out[..., 0])
    return np.ascontiguousarray(out[..., ::-1] if channel_order == 'bgr' else out)


@TRANSFORMS.register_module()
class Corrupt(BaseTransform):
    """Corrupt the loaded image with one common corruption at one severity.

    Put it right after ``LoadImageFromFile`` (before any resize: the corruption
    is made at the image's own resolution, as in Cityscapes-C and mmdet's
    benchmark). The seed of each image is :func:`corruption_seed` of ``seed``,
    its file name (``img_path``), the corruption and the severity.

    Required keys: ``img`` (uint8, BGR as mmcv loads it), ``img_path``.
    Modified keys: ``img``. Added keys: ``corruption`` (``(name, severity)``).

    Args:
        corruption (str): one of :data:`CORRUPTIONS`.
        severity (int): 1..5.
        seed (int): the run seed. Default: 0.
        channel_order (str): of the loaded image: ``'bgr'`` (mmcv's
            default) or ``'rgb'``. Default: ``'bgr'``.
    """

    def __init__(
        self,
        corruption: str,
        severity: int,
        seed: int = 0,
        channel_order: str = 'bgr',
    ) -> None:
        if corruption not in CORRUPTIONS:
            raise ValueError(
                f'unknown corruption {corruption!r}; choose from {CORRUPTIONS}'
            )
        if severity not in SEVERITIES:
            raise ValueError(f'severity must be in 1..5, got {severity!r}')
        corruption_package()  # fail at build time, naming the extra
        self.corruption = corruption
        self.severity = int(severity)
        self.seed = int(seed)
        self.channel_order = channel_order

    def transform(self, results: dict) -> dict:
        key = results.get('img_path')
        if not key:
            raise ValueError(
                'Corrupt needs img_path (its seed is made from the file name): '
                'put it right after LoadImageFromFile'
            )
        seed = corruption_seed(self.seed, key, self.corruption, self.severity)
        results['img'] = corrupt_image(
            results['img'],
            self.corruption,
            self.severity,
            seed,
            self.channel_order,
        )
        results['corruption'] = (self.corruption, self.severity)
        return results

    def __repr__(self) -> str:
        return (
            f'{self.__class__.__name__}(corruption={self.corruption!r}, '
            f'severity={self.severity}, seed={self.seed}, '
            f'channel_order={self.channel_order!r})'
        )


def with_corruption(
    transforms: Sequence, corruption: str, severity: int, seed: int = 0
) -> list:
    """A test pipeline's built transforms with ``Corrupt(corruption,
    severity, seed)`` right after the image loading one (the first whose class
    name contains ``LoadImage``), in that transform's channel order."""
    transforms = list(transforms)
    for i, t in enumerate(transforms):
        name = type(t).__name__
        if 'LoadImage' in name:
            if getattr(t, 'to_float32', False):
                raise ValueError(
                    f'{name} with to_float32=True: the corruptions apply to the '
                    'uint8 image as loaded; drop to_float32 from the test pipeline'
                )
            order = 'rgb' if getattr(t, 'channel_order', 'bgr') == 'rgb' else 'bgr'
            corrupt = Corrupt(corruption, severity, seed=seed, channel_order=order)
            return transforms[: i + 1] + [corrupt] + transforms[i + 1 :]
    raise ValueError(
        'the test pipeline has no image loading transform (LoadImageFromFile) '
        'to put the corruption after; corruptions apply to the image as loaded'
    )


def corruption_library_versions() -> dict:
    """The versions the corrupted images depend on (in the cache key and the
    results file)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        'imagecorruptions-imaug',
        'imagecorruptions',
        'numpy',
        'scipy',
        'scikit-image',
        'opencv-python',
        'opencv-python-headless',
        'numba',
        'Pillow',
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
