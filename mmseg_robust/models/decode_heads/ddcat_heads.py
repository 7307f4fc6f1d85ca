"""DDC-AT decode heads: Dynamic Divide-and-Conquer Adversarial Training.

Xu, Zhao & Jia, "Dynamic Divide-and-Conquer Adversarial Training for Robust Semantic
Segmentation", ICCV 2021 (docs/algorithms.md section 5.3). Three sibling branches read
the same decoder features (the PSP or ASPP concatenation; the FPN concatenation for
UPerNet, :mod:`.ddcat_uper_head`):

- ``cls1``: the branch kept at inference. It *is* the plain head's
  ``bottleneck`` (UPerNet: ``fpn_bottleneck``) + dropout + ``conv_seg``, so
  dropping the other branches leaves a plain PSPNet / DeepLabv3 / UPerNet
  (:mod:`mmseg_robust.models.converters.ddcat_export`);
- ``cls2``: ``cls2_bottleneck`` + dropout + ``cls2`` (1x1 conv, K classes), the
  branch for pixels that the adversary flips;
- ``mask1``: ``mask1_bottleneck`` + dropout + ``mask1`` (1x1 conv, 2 ways), the
  per-pixel router.

As in the reference implementation every branch has its own bottleneck convolution
(3x3 for PSP, 1x1 for DeepLabv3) with BN and ReLU before its classifier, so that the
published checkpoints convert tensor for tensor
(:mod:`mmseg_robust.models.converters.semseg`).

``forward``/``predict`` return cls1 only: evaluation and test-time attacks see the
deployed model. Training uses :meth:`DDCATHeadMixin.loss` with the division labels
that ``AdversarialTrainLoop(scheme='ddcat')`` attaches to each data sample as
``gt_division``.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmseg.models.decode_heads import PSPHead
from mmseg.models.losses import accuracy
from mmseg.models.utils import resize
from torch import Tensor

from mmseg_robust.registry import MODELS

from .deeplabv3_head import DeepLabV3Head

__all__ = [
    'DDCATASPPHead',
    'DDCATHeadMixin',
    'DDCATPSPHead',
    'DDCAT_EXTRA_BRANCHES',
    'division_labels',
    'route_logits',
]

#: Sub-modules of a DDC-AT head that exist only for training; deployment
#: (:func:`mmseg_robust.models.converters.ddcat_export.export_plain_state_dict`)
#: drops them.
DDCAT_EXTRA_BRANCHES = ('cls2_bottleneck', 'cls2', 'mask1_bottleneck', 'mask1')

_MISSING_DIVISION = (
    '{head} needs the DDC-AT division label `gt_division` (a PixelData of shape '
    '(1, H, W), values 0/1) on every data sample, and sample {idx} has none. '
    'Train DDC-AT heads with '
    "train_cfg=dict(type='AdversarialTrainLoop', scheme='ddcat', ...), which "
    'computes the labels; for clean or SAT training use the plain head '
    '(PSPHead / DeepLabV3Head).'
)


def division_labels(clean_routed_pred: Tensor, adv_routed_pred: Tensor) -> Tensor:
    """DDC-AT division label (section 5.3): 1 where the eval-mode routed prediction
    on the adversarial input differs from the one on the clean input, else 0.

    Every pixel gets a label, ignore-index (255) pixels included: the router is
    trained on all pixels, as in the reference.

    Args:
        clean_routed_pred (Tensor): class indices (B, H, W) of the routed output
            on clean images (``routed_logits(...).argmax(1)``).
        adv_routed_pred (Tensor): the same on the adversarial images.

    Returns:
        Tensor: long tensor (B, H, W) with values in {0, 1}.

    Example:
        >>> division_labels(torch.tensor([[0, 1]]), torch.tensor([[0, 2]]))
        tensor([[0, 1]])
    """
    if clean_routed_pred.shape != adv_routed_pred.shape:
        raise ValueError(
            'division_labels needs predictions of one shape, got '
            f'{tuple(clean_routed_pred.shape)} and {tuple(adv_routed_pred.shape)}'
        )
    if clean_routed_pred.is_floating_point() or adv_routed_pred.is_floating_point():
        raise TypeError(
            'division_labels takes class-index predictions (the argmax '
            'of the routed logits), not logits'
        )
    return (clean_routed_pred != adv_routed_pred).long()


def route_logits(cls1: Tensor, cls2: Tensor, mask1: Tensor) -> Tensor:
    """Hard routing of DDC-AT (section 5.3): ``m*cls2 + (1-m)*cls1`` with
    ``m = argmax(mask1)`` per pixel.

    The routing is a hard selection: no gradient flows into ``mask1`` through it
    (the router learns from its own cross-entropy on the division labels); the
    selected branch receives the gradient of its pixels. Ties in ``mask1`` go to
    cls1.

    Args:
        cls1 (Tensor): logits (B, K, H, W) of the kept branch.
        cls2 (Tensor): logits (B, K, H, W) of the extra branch.
        mask1 (Tensor): router logits (B, 2, H, W), same H, W.

    Returns:
        Tensor: routed logits (B, K, H, W).
    """
    if (
        cls1.shape != cls2.shape
        or mask1.shape[2:] != cls1.shape[2:]
        or mask1.shape[:2] != (cls1.shape[0], 2)
    ):
        raise ValueError(
            'route_logits needs cls1 and cls2 of one shape (B, K, H, W) and mask1 '
            f'(B, 2, H, W); got {tuple(cls1.shape)}, {tuple(cls2.shape)}, '
            f'{tuple(mask1.shape)}'
        )
    m = mask1.detach().argmax(1, keepdim=True) == 1
    return torch.where(m, cls2, cls1)


class DDCATHeadMixin:
    """The DDC-AT branches, routing and loss on top of a plain mmseg head.

    The plain head must build the convolution that precedes its classifier
    ``conv_seg`` (a ``ConvModule``, named by :attr:`cls1_bottleneck_name`:
    ``bottleneck`` for PSP / ASPP, ``fpn_bottleneck`` for UPerNet) and the class
    using the mixin must implement :meth:`_pyramid_features` (the decoder features
    that convolution reads). cls2 and mask1 get their own freshly initialised
    copies of its architecture. The mixin comes first in the bases so that its
    :meth:`_forward_feature` and :meth:`loss` win.
    """

    #: Attribute name of the plain head's conv before ``conv_seg`` (cls1's
    #: bottleneck); cls1 is ``conv_seg(dropout(<this>(_pyramid_features(x))))``.
    cls1_bottleneck_name = 'bottleneck'

    @property
    def cls1_bottleneck(self) -> ConvModule:
        """The plain head's conv before ``conv_seg``: cls1's bottleneck."""
        return getattr(self, self.cls1_bottleneck_name)

    def _init_ddcat(self, loss_mask_weight: float) -> None:
        self.loss_mask_weight = float(loss_mask_weight)
        self.cls2_bottleneck = self._new_bottleneck()
        self.cls2 = nn.Conv2d(self.channels, self.out_channels, kernel_size=1)
        self.mask1_bottleneck = self._new_bottleneck()
        self.mask1 = nn.Conv2d(self.channels, 2, kernel_size=1)

    def _new_bottleneck(self) -> ConvModule:
        """A freshly initialised copy of the architecture of cls1's bottleneck
        (:attr:`cls1_bottleneck`)."""
        conv = self.cls1_bottleneck.conv
        return ConvModule(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            padding=conv.padding,
            dilation=conv.dilation,
            conv_cfg=self.conv_cfg,
            norm_cfg=self.norm_cfg,
            act_cfg=self.act_cfg,
        )

    def _pyramid_features(self, inputs: List[Tensor]) -> Tensor:
        """Decoder features shared by the three branches (before bottlenecks)."""
        raise NotImplementedError

    def _forward_feature(self, inputs: List[Tensor]) -> Tensor:
        # cls1's features: the plain head's computation, so forward() == plain head
        return self.cls1_bottleneck(self._pyramid_features(inputs))

    def _classify(self, feat: Tensor, conv: nn.Conv2d) -> Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return conv(feat)

    def branch_logits(self, inputs: List[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """Logits of the three branches at the decoder resolution.

        Returns:
            tuple[Tensor]: ``cls1`` (B, K, h, w), ``cls2`` (B, K, h, w) and
            ``mask1`` (B, 2, h, w).
        """
        feats = self._pyramid_features(inputs)
        cls1 = self.cls_seg(self.cls1_bottleneck(feats))
        cls2 = self._classify(self.cls2_bottleneck(feats), self.cls2)
        mask1 = self._classify(self.mask1_bottleneck(feats), self.mask1)
        return cls1, cls2, mask1

    def routed_logits(
        self, inputs: List[Tensor], size: Optional[Sequence[int]] = None
    ) -> Tensor:
        """Routed output ``m*cls2 + (1-m)*cls1``, ``m = argmax(mask1)``.

        Uses the module's current mode: call it with the model in eval mode for the
        division labels (the training loop's attack context does).

        Args:
            inputs (list[Tensor]): backbone features, as for ``forward``.
            size (tuple[int], optional): if given, the three branches are
                upsampled (bilinear, ``align_corners`` of the head) to this size
                *before* routing, as in the reference implementation (routing on
                the full-resolution router logits). If None (default), routing
                happens at the decoder resolution and the caller upsamples.

        Returns:
            Tensor: routed logits (B, K, h, w), or (B, K, *size).
        """
        branches = self.branch_logits(inputs)
        if size is not None:
            branches = [self._upsample(t, size) for t in branches]
        return route_logits(*branches)

    def _upsample(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return resize(
            x,
            size=tuple(size),
            mode='bilinear',
            align_corners=self.align_corners,
            warning=False,
        )

    def _stack_division(self, batch_data_samples) -> Tensor:
        divisions = []
        for idx, sample in enumerate(batch_data_samples):
            if not hasattr(sample, 'gt_division'):
                raise ValueError(
                    _MISSING_DIVISION.format(head=type(self).__name__, idx=idx)
                )
            divisions.append(sample.gt_division.data)
        return torch.stack(divisions, dim=0).squeeze(1).long()

    def loss(self, inputs: List[Tensor], batch_data_samples, train_cfg=None) -> dict:
        """DDC-AT training loss (section 5.3), without the auxiliary head:
        ``CE(final, y, ignore 255) + loss_mask_weight * CE(mask1, division)``.

        All three branches are upsampled to the label size first, then routed.
        The first term is the head's ``loss_decode`` (``loss_ce``); the router
        term (``loss_mask``) is a plain mean cross-entropy over every pixel, with
        no ignore index.

        Args:
            inputs (list[Tensor]): backbone features.
            batch_data_samples (list[SegDataSample]): with ``gt_sem_seg`` and
                ``gt_division`` (PixelData, long (1, H, W), values 0/1).
            train_cfg (dict): unused, as in mmseg's heads.

        Returns:
            dict[str, Tensor]: ``loss_ce`` (or the names of ``loss_decode``),
            ``loss_mask``, ``acc_seg`` (of the routed output), ``acc_mask``.
        """
        division = self._stack_division(batch_data_samples)
        seg_label = self._stack_batch_gt(batch_data_samples)
        size = seg_label.shape[2:]
        if division.shape != (seg_label.shape[0], *size):
            raise ValueError(
                f'gt_division has shape {tuple(division.shape[1:])} per sample but '
                f'gt_sem_seg has {tuple(size)}: the division labels must cover the '
                '(padded) label map'
            )
        if division.numel() and (division.min() < 0 or division.max() > 1):
            raise ValueError('gt_division must hold 0/1 labels')
        cls1, cls2, mask1 = (
            self._upsample(t, size) for t in self.branch_logits(inputs)
        )
        final = route_logits(cls1, cls2, mask1)
        # final is already at label size; mmseg's loss_by_feat applies
        # loss_decode (with ignore_index) and acc_seg to it.
        losses = self.loss_by_feat(final, batch_data_samples)
        losses['loss_mask'] = self.loss_mask_weight * F.cross_entropy(mask1, division)
        losses['acc_mask'] = accuracy(mask1, division)
        return losses


def _ddcat_init_cfg() -> dict:
    # mmseg initialises conv_seg with N(0, 0.01); do the same for the other
    # classifiers.
    return dict(
        type='Normal',
        std=0.01,
        override=[dict(name=n) for n in ('conv_seg', 'cls2', 'mask1')],
    )


@MODELS.register_module()
class DDCATPSPHead(DDCATHeadMixin, PSPHead):
    """PSP head with the DDC-AT branches (cls1 = the plain PSP classifier).

    Args:
        loss_mask_weight (float): weight of the router's cross-entropy. Default:
            1.0 (section 5.3).
        **kwargs: arguments of :class:`~mmseg.models.decode_heads.PSPHead`
            (``pool_scales=(1, 2, 3, 6)``, ``in_channels``, ``channels``, ...).

    Example:
        >>> head = MODELS.build(dict(type='DDCATPSPHead', in_channels=2048,
        ...     channels=512, num_classes=21))
        >>> routed = head.routed_logits(feats)  # (B, 21, h, w)
    """

    def __init__(self, loss_mask_weight: float = 1.0, **kwargs):
        kwargs.setdefault('init_cfg', _ddcat_init_cfg())
        super().__init__(**kwargs)
        self._init_ddcat(loss_mask_weight)

    def _pyramid_features(self, inputs: List[Tensor]) -> Tensor:
        x = self._transform_inputs(inputs)
        return torch.cat([x, *self.psp_modules(x)], dim=1)


@MODELS.register_module()
class DDCATASPPHead(DDCATHeadMixin, DeepLabV3Head):
    """ASPP (DeepLabv3) head with the DDC-AT branches (cls1 = the plain
    classifier). A subclass of mmseg's ``ASPPHead`` through
    :class:`DeepLabV3Head`.

    Args:
        loss_mask_weight (float): weight of the router's cross-entropy. Default:
            1.0 (section 5.3).
        bottleneck_kernel_size (int): kernel of the bottleneck convolutions of
            the three branches. Default: 1 (DeepLabv3, DDC-AT reference); 3 is
            mmseg's ``ASPPHead``.
        **kwargs: arguments of :class:`~mmseg.models.decode_heads.ASPPHead`.
    """

    def __init__(
        self, loss_mask_weight: float = 1.0, bottleneck_kernel_size: int = 1, **kwargs
    ):
        kwargs.setdefault('init_cfg', _ddcat_init_cfg())
        super().__init__(bottleneck_kernel_size=bottleneck_kernel_size, **kwargs)
        self._init_ddcat(loss_mask_weight)

    def _pyramid_features(self, inputs: List[Tensor]) -> Tensor:
        x = self._transform_inputs(inputs)
        pooled = resize(
            self.image_pool(x),
            size=x.size()[2:],
            mode='bilinear',
            align_corners=self.align_corners,
        )
        return torch.cat([pooled, *self.aspp_modules(x)], dim=1)
