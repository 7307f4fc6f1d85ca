"""mmseg's VisionTransformer with strict ``Pretrained`` loading and, optionally,
the convolutional stem of the revisiting-at ViT-S-CvSt (docs/algorithms.md,
section 6)."""

import torch.nn as nn
from mmpretrain.models.utils import build_norm_layer
from mmseg.models.backbones import VisionTransformer

from mmseg_robust.registry import MODELS

from .strict_pretrained import load_pretrained_strict, split_pretrained_cfg

__all__ = ['VisionTransformerStrict', 'vit_conv_stem']


def vit_conv_stem(
    in_channels: int, embed_dims: int, base_channels: int = 48
) -> nn.Sequential:
    """ViT-CvSt stem of revisiting-at (stride 16): four conv3x3 s2 -> LN -> GELU
    (``in -> 48 -> 96 -> 192 -> 384``) and a 1x1 conv to ``embed_dims``.

    Parameters at indices 0, 1, 3, 4, 6, 7, 9, 10, 12 (the reference's
    ``patch_embed.proj.stem.{...}``).
    """
    norm_cfg = dict(type='LN2d', eps=1e-6)
    layers = []
    channels = in_channels
    for i in range(4):
        out = base_channels * 2**i
        layers += [
            nn.Conv2d(channels, out, kernel_size=3, stride=2, padding=1),
            build_norm_layer(norm_cfg, out),
            nn.GELU(),
        ]
        channels = out
    layers.append(nn.Conv2d(channels, embed_dims, kernel_size=1))
    return nn.Sequential(*layers)


@MODELS.register_module()
class VisionTransformerStrict(VisionTransformer):
    """mmseg's :class:`~mmseg.models.backbones.VisionTransformer`, loading
    ``init_cfg=dict(type='Pretrained', checkpoint=...)`` strictly.

    mmseg's own ``init_weights`` resizes ``pos_embed`` to ``img_size`` and then
    loads with ``strict=False``, so a checkpoint with other key names (e.g. timm's)
    loads nothing and only warns. This class resizes the same way (with
    ``interpolate_mode``) and then raises on any missing, unexpected or wrongly
    shaped tensor. Convert timm/revisiting-at checkpoints with
    ``tools/model_converters/revisiting_at_vit.py``.

    Unlike mmseg's VisionTransformer (``patch_bias=False``), the patch
    projection has a bias by default, as timm's ViTs and Segmenter's have: mmseg's
    non-strict loading silently drops that bias from converted timm weights.

    Args:
        stem (str): ``'patch'`` (the patchify stem, default, a ``patch_size``
            conv) or ``'conv'`` (the convolutional stem of revisiting-at's
            ViT-S-CvSt, :func:`vit_conv_stem`; needs ``patch_size=16``).
        **kwargs: arguments of mmseg's VisionTransformer.
    """

    def __init__(self, stem: str = 'patch', patch_bias: bool = True, **kwargs) -> None:
        super().__init__(patch_bias=patch_bias, **kwargs)
        if stem not in ('patch', 'conv'):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        self.stem = stem
        if stem == 'conv':
            if self.patch_size != 16:
                raise ValueError(
                    'the convolutional stem has stride 16: use '
                    f'patch_size=16, got {self.patch_size}'
                )
            # PatchEmbed keeps its adaptive padding to a multiple of 16 and
            # reads the output grid from the projection's output.
            self.patch_embed.projection = vit_conv_stem(
                kwargs.get('in_channels', 3), kwargs.get('embed_dims', 768)
            )

    def train(self, mode: bool = True) -> 'VisionTransformerStrict':
        # mmseg's VisionTransformer.train returns None; nn.Module's contract (and
        # ``model.eval()`` chains) expect the module.
        super().train(mode)
        return self

    def _resize_pos_embed_of(self, state: dict) -> dict:
        pos = state.get('pos_embed')
        if pos is not None and pos.shape != self.pos_embed.shape:
            grid = int(round((pos.shape[1] - 1) ** 0.5))
            if grid * grid + 1 != pos.shape[1]:
                raise ValueError(
                    f'pos_embed of shape {tuple(pos.shape)} is not '
                    'a square grid plus one class token'
                )
            h, w = self.img_size
            state['pos_embed'] = self.resize_pos_embed(
                pos,
                (h // self.patch_size, w // self.patch_size),
                (grid, grid),
                self.interpolate_mode,
            )
        return state

    def init_weights(self) -> None:
        pretrained, _ = split_pretrained_cfg(self.init_cfg)
        if pretrained is None:
            super().init_weights()
            return
        load_pretrained_strict(
            self,
            pretrained['checkpoint'],
            prefix=pretrained.get('prefix'),
            revise=self._resize_pos_embed_of,
            hint='Convert timm/revisiting-at ViT checkpoints with '
            'tools/model_converters/revisiting_at_vit.py.',
        )
        self._is_init = True
