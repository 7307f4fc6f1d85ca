"""The pixel-space view of an mmseg segmentor (docs/algorithms.md section 1).

Attacks perturb un-normalised images in ``[0, 1]``; mmseg models normalise inside
their ``SegDataPreProcessor`` (BGR->RGB, ``(x - mean) / std`` on 0..255, test-time
padding). :class:`SegmentorPixelView` turns a data batch into

- ``images``: ``(B, 3, H, W)`` in ``[0, 1]``, in the channel order the network sees
  (after the preprocessor's BGR->RGB conversion), without padding;
- ``labels``: ``(B, H', W')`` ground truth at the resolution mmseg evaluates at
  (``ori_shape``);
- a callable ``view(images) -> logits (B, K, H', W')`` that normalises, pads like
  the preprocessor, runs the segmentor's own ``inference`` (whole, slide or
  ``SlideSoftmaxEncoderDecoder``'s ``slide_softmax``), drops the padding and
  resizes to ``ori_shape`` exactly as ``postprocess_result`` does (with the
  segmentor's ``resize_seg_logits`` where it has one).

So ``view(images).argmax(1)`` is the prediction mmseg's test loop scores, and eps is
never applied to normalised tensors. The view keeps the model in whatever mode it
is in (callers put it in eval mode) and works on the unwrapped module under DDP.

:class:`TrainingBatchPixelView` is the same mapping for a *training* batch, as the
preprocessor stacks it: images of different sizes (crops smaller than the crop
size, no ``Pad`` in the pipeline) padded to a common size. Its logits come at the
padded batch size, the padding is held fixed at the preprocessor's value (the
attack cannot perturb it) and excluded from the losses by :attr:`valid`.
"""

import copy
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmengine.model import is_model_wrapper
from torch import Tensor

from .cheaper_passes import CheaperPasses

__all__ = [
    'PixelNormalizer',
    'SegmentorPixelView',
    'TrainingBatchPixelView',
    'ignore_index_of',
    'unwrap_model',
]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The segmentor inside a DDP/FSDP wrapper (attacks must not go through DDP)."""
    return model.module if is_model_wrapper(model) else model


def ignore_index_of(segmentor: torch.nn.Module) -> int:
    """The label value a segmentor's (last) decode head ignores (255 if unset).

    ``CascadeEncoderDecoder`` keeps its heads in a ``ModuleList``: the last one
    makes the prediction.
    """
    head = getattr(unwrap_model(segmentor), 'decode_head', None)
    if isinstance(head, torch.nn.ModuleList):
        head = head[-1]
    return int(getattr(head, 'ignore_index', 255))


class PixelNormalizer:
    """Maps between a ``SegDataPreProcessor``'s normalised tensors and pixel
    images in ``[0, 1]`` (section 1: eps applies to the latter)."""

    def __init__(self, data_preprocessor) -> None:
        self.normalize = bool(getattr(data_preprocessor, '_enable_normalize', False))
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
        passes (CheaperPasses, optional): speed options for the segmentor's
            calls (:mod:`~mmseg_robust.models.cheaper_passes`); the
            normalisation, padding, cropping and resizing stay the same.

    Attributes:
        images (Tensor): ``(B, 3, H, W)`` float in ``[0, 1]``.
        labels (Tensor): long ``(B, H', W')``, at ``ori_shape``.
        data_samples (list): the preprocessed data samples (with padding metainfo).

    Example:
        >>> view = SegmentorPixelView(model, data_batch)
        >>> adv = attack(view, view.images, view.labels)
    """

    def __init__(
        self,
        segmentor: torch.nn.Module,
        data: dict,
        passes: Optional[CheaperPasses] = None,
    ) -> None:
        self.model = unwrap_model(segmentor)
        self.passes = passes if passes is not None else CheaperPasses()
        self.passes.check(self.model)
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
            inputs[:, :, top : h_pad - bottom, left : w_pad - right]
        )
        self.ori_shape = tuple(self.metas[0]['ori_shape'][:2])
        self.labels = (
            torch.stack(
                [ds.gt_sem_seg.data.squeeze(0).long() for ds in self.data_samples]
            ).to(self.images.device)
            if self._has_labels()
            else None
        )
        self.flip = self.metas[0].get('flip', False)
        self.flip_direction = self.metas[0].get('flip_direction', None)

    def _has_labels(self) -> bool:
        return all('gt_sem_seg' in ds for ds in self.data_samples)

    def _check_uniform(self) -> None:
        keys = (
            'ori_shape',
            'img_padding_size',
            'padding_size',
            'flip',
            'flip_direction',
        )
        first = [self.metas[0].get(k) for k in keys]
        for meta in self.metas[1:]:
            if [meta.get(k) for k in keys] != first:
                raise ValueError(
                    'the images of one batch have different original shapes, '
                    'padding or flips, so their labels cannot be stacked for the '
                    'attack: set test_dataloader.batch_size=1 (as mmseg does for '
                    'datasets with images of different sizes).'
                )

    def __call__(self, images: Tensor) -> Tensor:
        """Logits ``(B, K, H', W')`` at ``ori_shape`` of pixel images in [0, 1]."""
        x = self.normalizer.to_inputs(images)
        left, right, top, bottom = self.padding
        if any(self.padding):
            x = F.pad(x, (left, right, top, bottom), value=self.pad_val)
        logits = self.passes.inference(self.model, x, self.metas)
        h, w = logits.shape[2:]
        logits = logits[:, :, top : h - bottom, left : w - right]
        if self.flip:
            logits = logits.flip(
                dims=(3,) if self.flip_direction == 'horizontal' else (2,)
            )
        if tuple(logits.shape[2:]) != self.ori_shape:
            logits = self._resize(logits)
        return logits

    def _resize(self, logits: Tensor) -> Tensor:
        # A segmentor that resizes its prediction its own way says so with
        # ``resize_seg_logits`` (SlideSoftmaxEncoderDecoder resizes probabilities,
        # as the SAT/DDC-AT test protocol does): the attack then differentiates
        # what is scored. Otherwise mmseg's postprocess_result resize.
        resize = getattr(self.model, 'resize_seg_logits', None)
        if resize is not None:
            return resize(logits, self.ori_shape)
        return F.interpolate(
            logits,
            size=self.ori_shape,
            mode='bilinear',
            align_corners=self._align_corners(),
        )

    def _align_corners(self) -> bool:
        return bool(getattr(self.model, 'align_corners', False))

    @torch.no_grad()
    def predict(self, images: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Logits and prediction at ``images`` (the clean images by default)."""
        logits = self(self.images if images is None else images)
        return logits, logits.argmax(1)


class TrainingBatchPixelView:
    """Pixel-space view of a preprocessed *training* batch (padded, stacked).

    In training mode mmseg's ``SegDataPreProcessor`` pads every image (and its
    label map, with ``seg_pad_val``) at the bottom/right to a common size (the
    ``size`` of the preprocessor, or the largest image), and records each image's
    unpadded ``img_shape`` as a ``torch.Size``. The decode heads resize the
    logits of the whole batch to image 0's ``img_shape`` in that case, so this
    view hands the model metainfo whose ``img_shape``/``pad_shape`` is the padded
    size: logits, images and labels then share one resolution.

    Args:
        segmentor (nn.Module): the segmentor (DDP wrappers are unwrapped).
        inputs (Tensor): the preprocessor's normalised, padded batch
            ``(B, 3, H, W)``.
        data_samples (list): its data samples (padded ``gt_sem_seg``, metainfo
            with ``padding_size``).

    Attributes:
        images (Tensor): ``(B, 3, H, W)`` in ``[0, 1]``, the network's channel
            order, at the padded size.
        labels (Tensor): long ``(B, H, W)``, padding holds ``seg_pad_val``.
        valid (Tensor | None): bool ``(B, H, W)``, False on padding; None when
            no image of the batch is padded.
        metas (list[dict]): the metainfo the model sees (padded shapes).

    Example:
        >>> view = TrainingBatchPixelView(model, processed['inputs'],
        ...                               processed['data_samples'])
        >>> out = attack.run(view, view.images, view.labels, view.valid)
    """

    def __init__(
        self, segmentor: torch.nn.Module, inputs: Tensor, data_samples
    ) -> None:
        self.model = unwrap_model(segmentor)
        self.normalizer = PixelNormalizer(self.model.data_preprocessor)
        shape = tuple(int(s) for s in inputs.shape[2:])
        self.metas = [
            dict(ds.metainfo, img_shape=shape, pad_shape=shape) for ds in data_samples
        ]
        self.padding = [
            tuple(int(p) for p in ds.metainfo.get('padding_size', (0, 0, 0, 0)))
            for ds in data_samples
        ]
        self.images = self.normalizer.to_pixels(inputs)
        self.labels = torch.stack(
            [ds.gt_sem_seg.data.squeeze(0).long() for ds in data_samples]
        )
        self.valid: Optional[Tensor] = None
        if any(any(p) for p in self.padding):
            h, w = shape
            valid = torch.zeros(
                (len(self.padding), h, w), dtype=torch.bool, device=self.images.device
            )
            for i, (left, right, top, bottom) in enumerate(self.padding):
                valid[i, top : h - bottom, left : w - right] = True
            self.valid = valid
        self._fill = self.images if self.valid is not None else None

    def subset(self, index: Sequence[int]) -> 'TrainingBatchPixelView':
        """The view of some images of the batch (in the given order)."""
        sub = copy.copy(self)
        idx = torch.as_tensor(list(index), device=self.images.device)
        sub.metas = [self.metas[i] for i in index]
        sub.padding = [self.padding[i] for i in index]
        sub.images, sub.labels = self.images[idx], self.labels[idx]
        if self.valid is not None:
            sub.valid, sub._fill = self.valid[idx], self._fill[idx]
        return sub

    def _inputs(self, images: Tensor) -> Tensor:
        if self.valid is not None:
            # The padding is not part of the image: hold it at the
            # preprocessor's value (no gradient reaches it).
            images = torch.where(self.valid.unsqueeze(1), images, self._fill)
        return self.normalizer.to_inputs(images)

    def __call__(self, images: Tensor) -> Tensor:
        """Main-head logits ``(B, K, H, W)`` at the padded batch size."""
        return self.model.encode_decode(self._inputs(images), self.metas)

    def routed_prediction(self, images: Tensor) -> Tensor:
        """DDC-AT: argmax of the routed output of the eval-mode heads
        (docs/algorithms.md, DDC-AT), at the padded batch size."""
        feats = self.model.extract_feat(self._inputs(images))
        # the branches are upsampled to the input size before routing, as in the
        # reference implementation
        logits = self.model.decode_head.routed_logits(feats, size=images.shape[2:])
        return logits.argmax(1)

    def raw_inputs(self, images: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
        """Pixel images -> raw inputs as the data loader gives them.

        Args:
            images (Tensor): ``(B, 3, H, W)`` in ``[0, 1]`` (this view's images
                or an attack's output).
            like (list[Tensor]): the loader's inputs of the same images (uint8
                ``(3, h, w)``, the loader's channel order, unpadded).

        Returns:
            list[Tensor]: float ``(3, h, w)`` in 0..255, padding removed, in the
            loader's channel order, on the device of ``images`` (the model's:
            the data preprocessor moves inputs to its device anyway, so they
            need not go through host memory and back).
        """
        bgr_to_rgb = bool(
            getattr(self.model.data_preprocessor, 'channel_conversion', False)
        )
        out = []
        h, w = images.shape[2:]
        for img, (left, right, top, bottom), ref in zip(images, self.padding, like):
            x = img[:, top : h - bottom, left : w - right] * 255.0
            if bgr_to_rgb:
                x = x[[2, 1, 0]]
            if tuple(x.shape) != tuple(ref.shape):
                raise RuntimeError(
                    f'adversarial image of shape {tuple(x.shape)} does not '
                    f'match the input {tuple(ref.shape)}: unexpected padding '
                    'metainfo'
                )
            out.append(x)
        return out
