"""Backbones of the PIR-AT models (docs/algorithms.md section 6), registered in mmseg's
``MODELS``: ConvNeXt with the convolutional stem, and mmseg's ViT with strict
pretrained loading (and revisiting-at's optional convolutional stem)."""

from .convnext_cvst import ConvNeXtCvSt, conv_stem
from .strict_pretrained import load_pretrained_strict, split_pretrained_cfg
from .vit_strict import VisionTransformerStrict, vit_conv_stem

__all__ = [
    'ConvNeXtCvSt',
    'VisionTransformerStrict',
    'conv_stem',
    'load_pretrained_strict',
    'split_pretrained_cfg',
    'vit_conv_stem',
]
