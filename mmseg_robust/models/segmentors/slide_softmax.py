"""Sliding-window inference of the SAT/DDC-AT papers (docs/algorithms.md section 5.2).

Xu, Zhao & Jia (ICCV 2021) evaluate with the test script of the semseg toolbox
(hszhao/semseg), which differs from mmseg's ``test_cfg=dict(mode='slide')``:

- an image smaller than the crop is padded to the crop size with the ImageNet mean
  (zero after normalisation), ``pad // 2`` before and the rest after; mmseg runs
  smaller windows instead;
- the stride is ``ceil(crop * 2/3)`` and the grid ``ceil((size - crop) / stride) + 1``
  windows per side, the last one flush with the border;
- every window is run on itself and on its horizontal mirror; the two softmax
  probability maps are averaged (the mirror's flipped back);
- the overlapping windows' *probabilities* are averaged (mmseg averages logits);
- the probability map is resized bilinearly (OpenCV ``INTER_LINEAR``, i.e.
  ``align_corners=False``) to the output size, then the argmax is taken (mmseg
  resizes logits with the head's ``align_corners``).

:class:`SlideSoftmaxEncoderDecoder` reproduces this with ``test_cfg.mode=
'slide_softmax'``. Its ``inference`` returns the log of the averaged
probabilities, so that ``softmax`` of the "logits" *is* the averaged probability
map; argmax, mmseg's metrics and the attacks (which differentiate ``inference``
through :class:`~mmseg_robust.models.pixel_space.SegmentorPixelView`) all see the
same prediction. :meth:`~SlideSoftmaxEncoderDecoder.resize_seg_logits` is the
post-processing resize both the predict path and the pixel-space view use.
"""

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.models.segmentors import EncoderDecoder
from mmseg.models.utils import resize
from torch import Tensor

from mmseg_robust.registry import MODELS

__all__ = ['SlideSoftmaxEncoderDecoder']

MODE = 'slide_softmax'


def _log_probs(probs: Tensor) -> Tensor:
    # Probabilities that underflowed to 0 get log(tiny) instead of -inf, so the
    # attacks' losses stay finite; softmax of the result is still ``probs``.
    return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))


@MODELS.register_module()
class SlideSoftmaxEncoderDecoder(EncoderDecoder):
    """``EncoderDecoder`` with the SAT/DDC-AT test protocol as a test mode.

    With ``test_cfg.mode`` ``'whole'`` or ``'slide'`` it is mmseg's
    ``EncoderDecoder``, unchanged. With ``'slide_softmax'``:

    1. the (normalised) image is padded to at least the crop size with 0, i.e.
       the data preprocessor's mean, ``pad // 2`` at the top/left, the rest at
       the bottom/right;
    2. windows of ``crop_size`` at stride ``ceil(crop * stride_rate)``, the
       last window of a row/column flush with the border;
    3. each window and its horizontal mirror (``flip=True``) go through the
       model in one batch; the model's logits, at the window size (the decode
       head's own upsampling), become softmax probabilities, the mirror's are
       flipped back, the two are averaged;
    4. the probabilities of overlapping windows are averaged and the padding is
       removed;
    5. ``inference`` returns the log of these probabilities;
       :meth:`resize_seg_logits` resizes probabilities (bilinear,
       ``align_corners=False``) to the output size (``ori_shape``).

    Args:
        test_cfg (dict): for the protocol ``dict(mode='slide_softmax',
            crop_size=(h, w), stride_rate=2/3, flip=True)``; ``stride_rate``
            and ``flip`` default to the reference's 2/3 and True.
        **kwargs: the arguments of mmseg's ``EncoderDecoder``.

    Example:
        >>> model = dict(type='SlideSoftmaxEncoderDecoder', ...,
        ...              test_cfg=dict(mode='slide_softmax', crop_size=(473, 473)))
    """

    def __init__(self, *args, test_cfg: Optional[dict] = None, **kwargs) -> None:
        super().__init__(*args, test_cfg=test_cfg, **kwargs)
        if self._slide_softmax:
            self._check_test_cfg()

    @property
    def _slide_softmax(self) -> bool:
        return (self.test_cfg or {}).get('mode', 'whole') == MODE

    def _check_test_cfg(self) -> None:
        cfg = self.test_cfg
        if 'stride' in cfg:
            raise ValueError(
                "test_cfg mode='slide_softmax' takes stride_rate (the reference's "
                f'2/3 of the crop), not stride; got stride={cfg["stride"]}: '
                'remove it (test_cfg=dict(_delete_=True, ...) in a config that '
                "inherits mode='slide')"
            )
        crop = cfg.get('crop_size')
        if crop is None or len(crop) != 2 or any(int(c) != c or c <= 0 for c in crop):
            raise ValueError(
                "test_cfg mode='slide_softmax' needs crop_size=(h, w), two "
                f'positive ints (the training crop), got {crop!r}'
            )
        rate = cfg.get('stride_rate', 2 / 3)
        if not 0 < rate <= 1:
            raise ValueError(f'test_cfg.stride_rate must be in (0, 1], got {rate}')

    def inference(self, inputs: Tensor, batch_img_metas: List[dict]) -> Tensor:
        """Segmentation logits of normalised ``inputs`` ``(B, 3, H, W)``.

        In ``'slide_softmax'`` mode: log of the averaged window probabilities,
        ``(B, K, H, W)`` (the steps of the class docstring); else mmseg's.
        """
        if not self._slide_softmax:
            return super().inference(inputs, batch_img_metas)
        ori_shape = batch_img_metas[0]['ori_shape']
        if not all(meta['ori_shape'] == ori_shape for meta in batch_img_metas):
            raise ValueError(
                'the images of one batch have different ori_shape: use '
                'test_dataloader.batch_size=1'
            )
        return _log_probs(self.slide_softmax_probs(inputs, batch_img_metas))

    def slide_softmax_probs(
        self, inputs: Tensor, batch_img_metas: List[dict]
    ) -> Tensor:
        """Averaged softmax probabilities ``(B, K, H, W)`` of the windows
        (steps 1-4 of the class docstring), differentiable in ``inputs``."""
        crop_h, crop_w = (int(c) for c in self.test_cfg['crop_size'])
        rate = self.test_cfg.get('stride_rate', 2 / 3)
        _, _, h, w = inputs.shape
        pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            # 0 in the normalised input = the preprocessor's mean (the reference
            # pads with the ImageNet mean)
            inputs = F.pad(inputs, (left, pad_w - left, top, pad_h - top), value=0.0)
        new_h, new_w = inputs.shape[2:]
        stride_h = int(math.ceil(crop_h * rate))
        stride_w = int(math.ceil(crop_w * rate))
        grid_h = int(math.ceil(float(new_h - crop_h) / stride_h) + 1)
        grid_w = int(math.ceil(float(new_w - crop_w) / stride_w) + 1)
        probs = None
        count = inputs.new_zeros((1, 1, new_h, new_w))
        for index_h in range(grid_h):
            y2 = min(index_h * stride_h + crop_h, new_h)
            y1 = y2 - crop_h
            for index_w in range(grid_w):
                x2 = min(index_w * stride_w + crop_w, new_w)
                x1 = x2 - crop_w
                window = self._window_probs(inputs[:, :, y1:y2, x1:x2], batch_img_metas)
                window = F.pad(window, (x1, new_w - x2, y1, new_h - y2))
                probs = window if probs is None else probs + window
                count[:, :, y1:y2, x1:x2] += 1
        probs = probs / count
        return probs[:, :, top : top + h, left : left + w]

    def _window_probs(self, window: Tensor, batch_img_metas: List[dict]) -> Tensor:
        """Softmax probabilities of one window, averaged with its mirror's."""
        # img_shape as a torch.Size: the decode head resizes its logits to it
        # (mmseg's convention for windows).
        metas = [dict(meta, img_shape=window.shape[2:]) for meta in batch_img_metas]
        if not self.test_cfg.get('flip', True):
            return self.encode_decode(window, metas).softmax(1)
        batch = len(metas)
        probs = self.encode_decode(
            torch.cat([window, window.flip(3)]), metas + metas
        ).softmax(1)
        return (probs[:batch] + probs[batch:].flip(3)) / 2

    def resize_seg_logits(self, seg_logits: Tensor, size: Sequence[int]) -> Tensor:
        """Resize logits ``(B, K, h, w)`` to ``size`` as the prediction is made.

        In ``'slide_softmax'`` mode the probabilities are resized (bilinear,
        ``align_corners=False``: the reference's ``cv2.resize`` with
        ``INTER_LINEAR``) and returned as log-probabilities; else the logits are
        resized as mmseg's ``postprocess_result`` does (the head's
        ``align_corners``).
        """
        size = tuple(int(s) for s in size[:2])
        if not self._slide_softmax:
            return resize(
                seg_logits,
                size=size,
                mode='bilinear',
                align_corners=self.align_corners,
                warning=False,
            )
        if tuple(seg_logits.shape[2:]) == size:
            return seg_logits
        probs = F.interpolate(
            seg_logits.exp(), size=size, mode='bilinear', align_corners=False
        )
        return _log_probs(probs)

    def postprocess_result(self, seg_logits: Tensor, data_samples=None):
        """mmseg's ``postprocess_result`` (padding removed, test-time flip undone,
        resized to ``ori_shape``), with :meth:`resize_seg_logits` as the resize."""
        if not self._slide_softmax or data_samples is None:
            return super().postprocess_result(seg_logits, data_samples)
        _, _, height, width = seg_logits.shape
        for i, sample in enumerate(data_samples):
            meta = sample.metainfo
            left, right, top, bottom = meta.get(
                'img_padding_size', meta.get('padding_size', [0] * 4)
            )
            logits = seg_logits[
                i : i + 1, :, top : height - bottom, left : width - right
            ]
            if meta.get('flip', None):
                direction = meta.get('flip_direction', None)
                if direction not in ('horizontal', 'vertical'):
                    raise ValueError(f'unknown flip_direction {direction!r}')
                logits = logits.flip(dims=(3,) if direction == 'horizontal' else (2,))
            logits = self.resize_seg_logits(logits, meta['ori_shape']).squeeze(0)
            sample.set_data(
                dict(
                    seg_logits=PixelData(data=logits),
                    pred_sem_seg=PixelData(data=logits.argmax(0, keepdim=True)),
                )
            )
        return data_samples
