"""The pixel-space view of an mmseg segmentor (ALGORITHMS.md section 1).

Attacks perturb un-normalised images in ``[0, 1]``; mmseg models normalise inside
their ``SegDataPreProcessor`` (BGR->RGB, ``(x - mean) / std`` on 0..255, test-time
padding). :class:`SegmentorPixelView` turns a data batch into

- ``images``: ``(B, 3, H, W)`` in ``[0, 1]``, in the channel order the network sees
  (after the preprocessor's BGR->RGB conversion), without padding;
- ``labels``: ``(B, H', W')`` ground truth at the resolution mmseg evaluates at
  (``ori_shape``);
- a callable ``view(images) -> logits (B, K, H', W')`` that normalises, pads like
  the preprocessor, runs the segmentor's own ``inference`` (whole or slide), drops
  the padding and resizes to ``ori_shape`` exactly as ``postprocess_result`` does.

So ``view(images).argmax(1)`` is the prediction mmseg's test loop scores, and eps is
never applied to normalised tensors. The view keeps the model in whatever mode it
is in (callers put it in eval mode) and works on the unwrapped module under DDP.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.model import is_model_wrapper
from torch import Tensor

__all__ = ['PixelNormalizer', 'SegmentorPixelView', 'unwrap_model']


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The segmentor inside a DDP/FSDP wrapper (attacks must not go through DDP)."""
    return model.module if is_model_wrapper(model) else model


class PixelNormalizer:
    """Maps between a ``SegDataPreProcessor``'s normalised tensors and pixel
    images in ``[0, 1]`` (section 1: eps applies to the latter)."""

    def __init__(self, data_preprocessor) -> None:
        self.normalize = bool(
            getattr(data_preprocessor, '_enable_normalize', False))
        self.mean = data_preprocessor.mean.float() if self.normalize else None
        self.std = data_preprocessor.std.float() if self.normalize else None

    def to_pixels(self, inputs: Tensor) -> Tensor:
        """Normalised network input -> detached pixel images in ``[0, 1]``."""
        x = inputs.float()
        if self.normalize:
            x = x * self.std + self.mean
        # 0..255 -> [0, 1]; clamp float round-off of the (x - m) / s * s + m trip.
        return (x / 255.0).clamp_(0, 1).detach()

    def to_inputs(self, images: Tensor) -> Tensor:
        """Pixel images in ``[0, 1]`` -> normalised network input (differentiable)."""
        x = images * 255.0
        return (x - self.mean) / self.std if self.normalize else x


class SegmentorPixelView:
    """Pixel-space model view of one batch of an mmseg segmentor.

    Args:
        segmentor (nn.Module): an mmseg segmentor (``EncoderDecoder``,
            ``CascadeEncoderDecoder``, ...), possibly wrapped in DDP.
        data (dict): a batch from an mmseg dataloader (``inputs`` list of uint8
            ``(3, H, W)`` tensors, ``data_samples`` with ``gt_sem_seg``).

    Attributes:
        images (Tensor): ``(B, 3, H, W)`` float in ``[0, 1]``.
        labels (Tensor): long ``(B, H', W')``, at ``ori_shape``.
        data_samples (list): the preprocessed data samples (with padding metainfo).

    Example:
        >>> view = SegmentorPixelView(model, data_batch)
        >>> adv = attack(view, view.images, view.labels)
    """

    def __init__(self, segmentor: torch.nn.Module, data: dict) -> None:
        self.model = unwrap_model(segmentor)
        pre = self.model.data_preprocessor
        self.normalizer = PixelNormalizer(pre)
        self.pad_val = float(getattr(pre, 'pad_val', 0))
        # The preprocessor (test mode) gives the padded, normalised batch and sets
        # padding metainfo; we keep its metainfo and rebuild everything else from
        # the pixel images so that gradients flow to them.
        processed = pre(data, False)
        inputs: Tensor = processed['inputs']
        self.data_samples = processed['data_samples']
        self.metas: List[dict] = [ds.metainfo for ds in self.data_samples]
        self._check_uniform()
        # Test-time padding is recorded as img_padding_size (as postprocess_result
        # reads it); padding_size comes from training-style stacking.
        meta = self.metas[0]
        pad = meta.get('img_padding_size', meta.get('padding_size', [0, 0, 0, 0]))
        self.padding = tuple(int(p) for p in pad)  # left, right, top, bottom
        self.padded_shape = tuple(inputs.shape[2:])
        left, right, top, bottom = self.padding
        h_pad, w_pad = self.padded_shape
        self.images = self.normalizer.to_pixels(
            inputs[:, :, top:h_pad - bottom, left:w_pad - right])
        self.ori_shape = tuple(self.metas[0]['ori_shape'][:2])
        self.labels = torch.stack([
            ds.gt_sem_seg.data.squeeze(0).long() for ds in self.data_samples
        ]).to(self.images.device) if self._has_labels() else None
        self.flip = self.metas[0].get('flip', False)
        self.flip_direction = self.metas[0].get('flip_direction', None)

    def _has_labels(self) -> bool:
        return all('gt_sem_seg' in ds for ds in self.data_samples)

    def _check_uniform(self) -> None:
        keys = ('ori_shape', 'img_padding_size', 'padding_size', 'flip',
                'flip_direction')
        first = [self.metas[0].get(k) for k in keys]
        for meta in self.metas[1:]:
            if [meta.get(k) for k in keys] != first:
                raise ValueError(
                    'the images of one batch have different original shapes, '
                    'padding or flips, so their labels cannot be stacked for the '
                    'attack: set test_dataloader.batch_size=1 (as mmseg does for '
                    'datasets with images of different sizes).')

    def __call__(self, images: Tensor) -> Tensor:
        """Logits ``(B, K, H', W')`` at ``ori_shape`` of pixel images in [0, 1]."""
        x = self.normalizer.to_inputs(images)
        left, right, top, bottom = self.padding
        if any(self.padding):
            x = F.pad(x, (left, right, top, bottom), value=self.pad_val)
        logits = self.model.inference(x, self.metas)
        h, w = logits.shape[2:]
        logits = logits[:, :, top:h - bottom, left:w - right]
        if self.flip:
            logits = logits.flip(dims=(3, ) if self.flip_direction ==
                                 'horizontal' else (2, ))
        if tuple(logits.shape[2:]) != self.ori_shape:
            logits = F.interpolate(
                logits,
                size=self.ori_shape,
                mode='bilinear',
                align_corners=self._align_corners())
        return logits

    def _align_corners(self) -> bool:
        return bool(getattr(self.model, 'align_corners', False))

    @torch.no_grad()
    def predict(self, images: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Logits and prediction at ``images`` (the clean images by default)."""
        logits = self(self.images if images is None else images)
        return logits, logits.argmax(1)
