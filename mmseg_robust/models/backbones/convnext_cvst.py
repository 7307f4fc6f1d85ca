"""ConvNeXt with the convolutional stem (CvSt) of the robust ImageNet models of
Singh, Croce & Hein, "Revisiting Adversarial Training for ImageNet" (NeurIPS 2023),
used as PIR-AT backbones (docs/algorithms.md sections 5.1 and 6)."""

from typing import Sequence

import torch.nn as nn
from mmpretrain.models.backbones import ConvNeXt
from mmpretrain.models.utils import build_norm_layer

from mmseg_robust.registry import MODELS

from .strict_pretrained import load_pretrained_strict, split_pretrained_cfg

__all__ = ['ConvNeXtCvSt', 'conv_stem']


def conv_stem(in_channels: int, out_channels: int, norm_cfg: dict) -> nn.Sequential:
    """The convolutional stem: conv3x3 s2 -> LN -> GELU -> conv3x3 s2 -> LN -> GELU.

    ``in_channels -> out_channels // 2 -> out_channels`` (3 -> 48 -> 96 for
    ConvNeXt-T/S), stride 4 in total like the 4x4 patchify stem it replaces.
    Indices 0, 1, 3, 4 hold the parameters (the reference's ``stem.stem.{0,1,3,4}``).
    """
    mid_channels = out_channels // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, kernel_size=3, stride=2, padding=1),
        build_norm_layer(norm_cfg, mid_channels),
        nn.GELU(),
        nn.Conv2d(mid_channels, out_channels, kernel_size=3, stride=2, padding=1),
        build_norm_layer(norm_cfg, out_channels),
        nn.GELU(),
    )


@MODELS.register_module()
class ConvNeXtCvSt(ConvNeXt):
    """ConvNeXt whose patchify stem is replaced by a convolutional stem.

    mmpretrain's :class:`~mmpretrain.models.backbones.ConvNeXt` with only
    ``downsample_layers[0]`` changed (see :func:`conv_stem`); stages, downsampling
    layers, blocks and the per-stage output norms ``norm0..norm3`` are inherited.
    LayerNorms are channels-first with eps 1e-6. With the defaults it returns four
    feature maps at strides 4/8/16/32 (96/192/384/768 channels for ``'tiny'`` and
    ``'small'``), as UperNet needs.

    ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` loads a backbone
    checkpoint (e.g. one written by ``tools/model_converters/
    revisiting_at_convnext.py``) *strictly*: a missing, unexpected or wrongly
    shaped tensor raises an error naming it, where mmengine's ``PretrainedInit``
    would only warn. ``prefix='backbone.'`` takes the backbone of a full
    segmentor checkpoint.

    Args:
        arch (str | dict): ``'tiny'`` (depths 3,3,9,3), ``'small'`` (3,3,27,3) or
            any mmpretrain ConvNeXt arch. Default: ``'tiny'``.
        out_indices (Sequence[int]): stages whose normed features are returned.
            Default: ``(0, 1, 2, 3)``.
        gap_before_final_norm (bool): as mmpretrain; False for dense prediction.
            Default: False.
        **kwargs: the other arguments of mmpretrain's ConvNeXt (``drop_path_rate``,
            ``layer_scale_init_value``, ``norm_cfg``, ``frozen_stages``,
            ``with_cp``, ``init_cfg``, ...).

    Example:
        >>> backbone = ConvNeXtCvSt(arch='tiny', drop_path_rate=0.4)
        >>> [f.shape[1] for f in backbone(torch.rand(1, 3, 64, 64))]
        [96, 192, 384, 768]
    """

    def __init__(
        self,
        arch='tiny',
        out_indices: Sequence[int] = (0, 1, 2, 3),
        gap_before_final_norm: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(
            arch=arch,
            out_indices=list(out_indices),
            gap_before_final_norm=gap_before_final_norm,
            **kwargs,
        )
        norm_cfg = kwargs.get('norm_cfg', dict(type='LN2d', eps=1e-6))
        self.downsample_layers[0] = conv_stem(
            kwargs.get('in_channels', 3), self.channels[0], norm_cfg
        )
        # The parent froze the stem it built; freeze the new one likewise.
        self._freeze_stages()

    def train(self, mode: bool = True) -> 'ConvNeXtCvSt':
        # mmpretrain's ConvNeXt.train returns None; nn.Module's contract (and
        # ``model.eval()`` chains) expect the module.
        super().train(mode)
        return self

    def init_weights(self) -> None:
        pretrained, _ = split_pretrained_cfg(self.init_cfg)
        if pretrained is None:
            super().init_weights()
            return
        # Every tensor comes from the checkpoint: no other init is needed.
        load_pretrained_strict(
            self,
            pretrained['checkpoint'],
            prefix=pretrained.get('prefix'),
            hint='Convert revisiting-at ImageNet checkpoints with '
            'tools/model_converters/revisiting_at_convnext.py.',
        )
        self._is_init = True
