"""Data transforms: a short-edge resize + centre crop, a random Gaussian blur, and
scoring at the resized image's resolution.

- :class:`ShortEdgeResizeCenterCrop`: the evaluation protocol of the SEA/PIR-AT
  papers (docs/algorithms.md section 5.1): resize the short side to the crop
  size (473 VOC, 512 ADE20K), evaluate on the centre crop.
- :class:`RandomGaussianBlur`: the PSPNet-style blur augmentation (p=0.5), in the
  PIL form of the PIR-AT trainings (random radius in [0, 1), section 5.1) or the
  fixed 5x5 OpenCV form of the SAT/DDC-AT pipelines (sections 5.2 and 5.3).
- :class:`ScoreAtImageShape`: predictions are made and scored at the resized
  image's resolution (the SAT/DDC-AT Cityscapes test protocol, section 5.2).

Resizing uses Pillow (``backend='pillow'``) like the PIR-AT reference, whose
bilinear downscaling is antialiased (OpenCV's is not).
"""

from typing import Optional

import cv2
import mmcv
import numpy as np
from mmcv.transforms import BaseTransform
from PIL import Image, ImageFilter

from mmseg_robust.registry import TRANSFORMS

__all__ = ['RandomGaussianBlur', 'ScoreAtImageShape', 'ShortEdgeResizeCenterCrop']


@TRANSFORMS.register_module()
class ShortEdgeResizeCenterCrop(BaseTransform):
    """Resize the short side to ``crop_size`` (keeping the aspect ratio), then take
    the centre ``crop_size x crop_size`` crop, of the image and its label maps.

    The evaluation protocol of SEA/PIR-AT (section 5.1): with ``w > h`` the new
    size is ``(int(w * s / h), s)``, else ``(s, int(h * s / w))``; the crop's
    top-left corner is ``(round((W - s) / 2), round((H - s) / 2))``. Images are
    resized bilinearly, label maps with nearest neighbour.

    The crop *is* the evaluated image: ``ori_shape`` is set to the crop's shape,
    so predictions are compared with the cropped labels (put
    ``LoadAnnotations`` before this transform).

    Required keys: ``img``; optional ``gt_seg_map`` and other ``seg_fields``.
    Modified keys: ``img``, ``img_shape``, ``ori_shape``, the seg fields.
    Added keys: ``scale_factor``, ``crop_bbox``.

    Args:
        crop_size (int): output side (473 VOC, 512 ADE20K).
        interpolation (str): image interpolation. Default: ``'bilinear'``.
        backend (str): ``'pillow'`` (the reference's) or ``'cv2'``.
            Default: ``'pillow'``.
    """

    def __init__(
        self, crop_size: int, interpolation: str = 'bilinear', backend: str = 'pillow'
    ) -> None:
        if int(crop_size) != crop_size or crop_size <= 0:
            raise ValueError(f'crop_size must be a positive int, got {crop_size}')
        self.crop_size = int(crop_size)
        self.interpolation = interpolation
        self.backend = backend

    def transform(self, results: dict) -> dict:
        s = self.crop_size
        h, w = results['img'].shape[:2]
        if w > h:
            new_w, new_h = int(1.0 * w * s / h), s
        else:
            new_w, new_h = s, int(1.0 * h * s / w)
        x1 = int(round((new_w - s) / 2.0))
        y1 = int(round((new_h - s) / 2.0))

        def resize_crop(array, interpolation):
            out = mmcv.imresize(
                array, (new_w, new_h), interpolation=interpolation, backend=self.backend
            )
            return np.ascontiguousarray(out[y1 : y1 + s, x1 : x1 + s])

        results['img'] = resize_crop(results['img'], self.interpolation)
        for key in results.get('seg_fields', []):
            results[key] = resize_crop(results[key], 'nearest')
        results['img_shape'] = (s, s)
        results['ori_shape'] = (s, s)
        results['scale_factor'] = (new_w / w, new_h / h)
        results['crop_bbox'] = (x1, y1, x1 + s, y1 + s)
        return results

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(crop_size={self.crop_size}, '
            f'interpolation={self.interpolation!r}, backend={self.backend!r})'
        )


@TRANSFORMS.register_module()
class RandomGaussianBlur(BaseTransform):
    """Blur the image with probability ``prob``, the PSPNet-style augmentation of
    the reference trainings, in one of two forms:

    - PIL (default, PIR-AT, docs/algorithms.md section 5.1): ``GaussianBlur`` of
      radius (standard deviation, in pixels) uniform in ``[0, max_radius)``.
    - OpenCV (``kernel_size`` set, SAT/DDC-AT, sections 5.2 and 5.3):
      ``cv2.GaussianBlur(img, (kernel_size, kernel_size), sigma)``, a fixed
      kernel; ``sigma=0`` lets OpenCV derive it from the kernel size
      (``cv2.getGaussianKernel``: for the reference's 5x5 the binomial
      ``[1, 4, 6, 4, 1] / 16`` in each direction).

    Labels are unchanged. The OpenCV form keeps the image's dtype: on the uint8
    images of ``LoadImageFromFile`` the result is rounded to integers (the
    semseg-style reference blurs float32 images; load with ``to_float32=True``
    to match it to the bit).

    Required / modified keys: ``img`` (H x W x C; uint8 for the PIL form).

    Args:
        prob (float): probability of blurring. Default: 0.5.
        max_radius (float, optional): PIL form: upper bound of the radius.
            Default: 1.0 (None); not allowed with ``kernel_size``.
        kernel_size (int, optional): OpenCV form: the odd side of the square
            kernel (the SAT/DDC-AT reference: 5). Default: None (PIL form).
        sigma (float): OpenCV form: the Gaussian's standard deviation in pixels,
            0 to derive it from ``kernel_size``. Default: 0.

    Example:
        >>> blur = RandomGaussianBlur(prob=0.5, kernel_size=5)  # SAT/DDC-AT
    """

    def __init__(
        self,
        prob: float = 0.5,
        max_radius: Optional[float] = None,
        kernel_size: Optional[int] = None,
        sigma: float = 0.0,
    ) -> None:
        if not 0 <= prob <= 1:
            raise ValueError(f'prob must be in [0, 1], got {prob}')
        if kernel_size is None:
            if sigma != 0:
                raise ValueError(
                    'sigma is an option of the OpenCV blur: set '
                    'kernel_size too (or use max_radius)'
                )
            max_radius = 1.0 if max_radius is None else max_radius
            if max_radius < 0:
                raise ValueError(f'max_radius must be >= 0, got {max_radius}')
        else:
            if max_radius is not None:
                raise ValueError(
                    'max_radius (PIL blur, random radius) and '
                    'kernel_size (OpenCV blur, fixed kernel) '
                    'exclude each other: set one of them'
                )
            if (
                int(kernel_size) != kernel_size
                or kernel_size < 1
                or kernel_size % 2 == 0
            ):
                raise ValueError(
                    'kernel_size must be a positive odd int (as '
                    f'cv2.GaussianBlur), got {kernel_size}'
                )
            if sigma < 0:
                raise ValueError(f'sigma must be >= 0, got {sigma}')
            kernel_size = int(kernel_size)
        self.prob = prob
        self.max_radius = max_radius
        self.kernel_size = kernel_size
        self.sigma = float(sigma)

    def transform(self, results: dict) -> dict:
        if np.random.rand() >= self.prob:
            return results
        img = results['img']
        if self.kernel_size is not None:
            k = self.kernel_size
            results['img'] = cv2.GaussianBlur(img, (k, k), self.sigma)
            return results
        if img.dtype != np.uint8:
            raise TypeError(
                'RandomGaussianBlur expects a uint8 image (load it '
                f'without to_float32), got {img.dtype}'
            )
        radius = float(np.random.rand()) * self.max_radius
        blurred = Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius))
        results['img'] = np.asarray(blurred).copy()
        return results

    def __repr__(self) -> str:
        if self.kernel_size is not None:
            return (
                f'{type(self).__name__}(prob={self.prob}, '
                f'kernel_size={self.kernel_size}, sigma={self.sigma})'
            )
        return f'{type(self).__name__}(prob={self.prob}, max_radius={self.max_radius})'


@TRANSFORMS.register_module()
class ScoreAtImageShape(BaseTransform):
    """Make the current image size the evaluated size: ``ori_shape`` is set to
    ``img_shape``.

    mmseg predicts at ``ori_shape`` (the file's size) and scores against
    ``gt_sem_seg``. The SAT/DDC-AT test protocol on Cityscapes (docs/algorithms.md
    section 5.2) resizes image *and* label to 1024x512 (the label with nearest
    neighbour) and scores there; with ``LoadAnnotations`` before the ``Resize``
    and this transform after it, the prediction comes at the resized label's
    resolution::

        dict(type='LoadImageFromFile', to_float32=True),
        dict(type='LoadAnnotations'),
        dict(type='Resize', scale=(1024, 512), keep_ratio=False),
        dict(type='ScoreAtImageShape'),

    Visualisation hooks then draw on the file's image at the resized size.

    Required keys: ``img_shape``. Modified keys: ``ori_shape``.
    """

    def transform(self, results: dict) -> dict:
        for key in results.get('seg_fields', []):
            if results[key].shape[:2] != tuple(results['img_shape'][:2]):
                raise ValueError(
                    f'{key} has shape {results[key].shape[:2]} but the image '
                    f'{tuple(results["img_shape"][:2])}: put LoadAnnotations '
                    'before the Resize, so that the label is resized with the '
                    'image and scored at its size'
                )
        results['ori_shape'] = tuple(results['img_shape'][:2])
        return results
