"""DDC-AT UPerNet head (docs/algorithms.md section 5.3 applied to mmseg's ``UPerHead``).

In ``UPerHead`` the convolution before the classifier is ``fpn_bottleneck`` (3x3,
on the concatenation of the FPN outputs); ``bottleneck`` is the PPM's
bottleneck, part of the shared decoder. So here:

- ``cls1`` = ``fpn_bottleneck`` + dropout + ``conv_seg``: the plain UPerHead's
  own modules, so that dropping the other branches leaves a plain UperNet
  (:mod:`mmseg_robust.models.converters.ddcat_export`);
- ``cls2`` = ``cls2_bottleneck`` + dropout + ``cls2`` and ``mask1`` =
  ``mask1_bottleneck`` + dropout + ``mask1``, where both bottlenecks are fresh
  copies of the ``fpn_bottleneck`` architecture reading the same FPN
  concatenation.

Routing, division labels and the loss are those of
:class:`~mmseg_robust.models.decode_heads.ddcat_heads.DDCATHeadMixin`.
"""

from typing import List

import torch
from mmseg.models.decode_heads import UPerHead
from mmseg.models.utils import resize
from torch import Tensor

from mmseg_robust.registry import MODELS

from .ddcat_heads import DDCATHeadMixin, _ddcat_init_cfg

__all__ = ['DDCATUPerHead']


@MODELS.register_module()
class DDCATUPerHead(DDCATHeadMixin, UPerHead):
    """UPerNet head with the DDC-AT branches (cls1 = the plain UPerNet
    classifier, ``fpn_bottleneck`` + ``conv_seg``).

    Args:
        loss_mask_weight (float): weight of the router's cross-entropy. Default:
            1.0 (section 5.3).
        **kwargs: arguments of :class:`~mmseg.models.decode_heads.UPerHead`
            (``pool_scales=(1, 2, 3, 6)``, ``in_channels``, ``channels``, ...).

    Example:
        >>> head = MODELS.build(dict(type='DDCATUPerHead',
        ...     in_channels=[96, 192, 384, 768], in_index=[0, 1, 2, 3],
        ...     channels=512, num_classes=21))
        >>> routed = head.routed_logits(feats)  # (B, 21, h, w)
    """

    cls1_bottleneck_name = 'fpn_bottleneck'

    def __init__(self, loss_mask_weight: float = 1.0, **kwargs):
        kwargs.setdefault('init_cfg', _ddcat_init_cfg())
        super().__init__(**kwargs)
        self._init_ddcat(loss_mask_weight)

    def _pyramid_features(self, inputs: List[Tensor]) -> Tensor:
        """The concatenated FPN outputs: ``UPerHead._forward_feature`` up to,
        not including, ``fpn_bottleneck`` (same operations, same order)."""
        inputs = self._transform_inputs(inputs)
        laterals = [
            lateral_conv(inputs[i]) for i, lateral_conv in enumerate(self.lateral_convs)
        ]
        laterals.append(self.psp_forward(inputs))
        # top-down path
        levels = len(laterals)
        for i in range(levels - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(
                laterals[i],
                size=laterals[i - 1].shape[2:],
                mode='bilinear',
                align_corners=self.align_corners,
            )
        fpn_outs = [self.fpn_convs[i](laterals[i]) for i in range(levels - 1)]
        fpn_outs.append(laterals[-1])  # the PSP feature
        for i in range(levels - 1, 0, -1):
            fpn_outs[i] = resize(
                fpn_outs[i],
                size=fpn_outs[0].shape[2:],
                mode='bilinear',
                align_corners=self.align_corners,
            )
        return torch.cat(fpn_outs, dim=1)
