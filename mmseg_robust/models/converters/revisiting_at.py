"""Converters for the robust ImageNet backbones of revisiting-at (Singh, Croce &
Hein, NeurIPS 2023) into PIR-AT backbone-init checkpoints (ALGORITHMS.md sections 5.1
and 7).

Source layouts (timm naming, possibly under ``module.`` / ``base_model.`` /
``model.`` prefixes, with the input normaliser ``normalize.{mean,std}``):

- ConvNeXt-CvSt: ``stem.stem.{0,1,3,4}``, ``stages.{1,2,3}.downsample.{0,1}``,
  ``stages.j.blocks.k.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}``, ``head.*``.
- ViT: ``cls_token``, ``pos_embed``, ``patch_embed.proj`` (or the convolutional
  stem ``patch_embed.proj.stem.i`` of ViT-S-CvSt), ``blocks.i.{norm1, attn.qkv,
  attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``.

The classifier head and the normaliser are dropped: PIR-AT feeds raw [0, 1] images
to the segmentation model without normalisation (section 5.1), as the reference
does when it loads these backbones.
"""
import math
from typing import Dict, Optional, Tuple, Union

import torch

from mmseg_robust.models.backbones import ConvNeXtCvSt, VisionTransformerStrict
from .common import (StateDict, apply_rules, check_converted,
                     convnext_arch_of, expected_layout,
                     strip_prefixes)

__all__ = [
    'convert_revisiting_at_convnext', 'convert_revisiting_at_vit',
    'timm_vit_block_rules'
]

WRAPPER_PREFIXES = ('module.', 'base_model.', 'model.')
NORMALIZER = [(r'normalize\.(mean|std)', None, None)]


def convert_revisiting_at_convnext(
        state_dict: StateDict,
        arch: Optional[Union[str, dict]] = None) -> Tuple[StateDict, dict]:
    """revisiting-at ConvNeXt-CvSt (timm naming) -> :class:`ConvNeXtCvSt` state dict.

    The per-stage output norms ``norm0..norm3`` do not exist in a classifier; they
    are written as identity LayerNorms (weight 1, bias 0), the initialisation the
    reference segmentation model gives them, so that the file loads strictly.

    Args:
        state_dict (dict): the source tensors (prefixes allowed).
        arch (str | dict, optional): expected architecture (``'tiny'``,
            ``'small'``, ...); inferred from the blocks when None, and checked.

    Returns:
        tuple: ``(state dict of ConvNeXtCvSt, meta)`` with ``meta`` listing the
        architecture, the dropped source tensors and the fresh ones.

    Raises:
        KeyError / ValueError: a tensor of an unknown layout, or a missing or
            wrongly shaped one, named in the message.
    """
    state = strip_prefixes(state_dict, WRAPPER_PREFIXES)
    inferred = convnext_arch_of(state, 'stages.{j}.blocks.',
                                'stages.{j}.blocks.0.conv_dw.weight',
                                'timm ConvNeXt')
    if arch is not None and arch != inferred:
        raise ValueError(f'the checkpoint is ConvNeXt {inferred}, not {arch}')
    rules = NORMALIZER + [
        (r'head\..*', None, None),
        (r'stem\.stem\.([0134])\.(weight|bias)', r'downsample_layers.0.\1.\2',
         None),
        (r'stages\.([123])\.downsample\.([01])\.(weight|bias)',
         r'downsample_layers.\1.\2.\3', None),
        (r'stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(weight|bias)',
         r'stages.\1.\2.depthwise_conv.\3', None),
        (r'stages\.(\d+)\.blocks\.(\d+)\.norm\.(weight|bias)',
         r'stages.\1.\2.norm.\3', None),
        (r'stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)',
         r'stages.\1.\2.pointwise_conv1.\3', None),
        (r'stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)',
         r'stages.\1.\2.pointwise_conv2.\3', None),
        (r'stages\.(\d+)\.blocks\.(\d+)\.gamma', r'stages.\1.\2.gamma', None),
    ]
    out, dropped = apply_rules(state, rules, 'revisiting-at ConvNeXt checkpoint')
    model = ConvNeXtCvSt(arch=inferred)
    expected = expected_layout(model)
    fresh = []
    for i in range(4):
        for name, value in (('weight', 1.0), ('bias', 0.0)):
            key = f'norm{i}.{name}'
            if key in out:
                raise KeyError(f'{key} should not be in a classifier checkpoint')
            out[key] = torch.full(expected[key], value)
            fresh.append(key)
    check_converted(out, expected, 'converted ConvNeXt-CvSt backbone')
    meta = dict(
        arch=inferred if isinstance(inferred, str) else str(inferred),
        dropped=dropped,
        fresh=fresh)
    return out, meta


def timm_vit_block_rules(src: str, dst: str) -> list:
    """Rules for the transformer blocks of a timm/Segmenter ViT under ``src``
    (e.g. ``'blocks'``) to mmseg's ``TransformerEncoderLayer`` under ``dst``.

    timm's fused ``qkv`` (rows q, k, v, heads contiguous) is exactly
    ``nn.MultiheadAttention``'s ``in_proj_weight`` layout.
    """
    s, d = src.replace('.', r'\.'), dst
    return [
        (rf'{s}\.(\d+)\.norm1\.(weight|bias)', rf'{d}.\1.ln1.\2', None),
        (rf'{s}\.(\d+)\.norm2\.(weight|bias)', rf'{d}.\1.ln2.\2', None),
        (rf'{s}\.(\d+)\.attn\.qkv\.(weight|bias)', rf'{d}.\1.attn.attn.in_proj_\2',
         None),
        (rf'{s}\.(\d+)\.attn\.proj\.(weight|bias)',
         rf'{d}.\1.attn.attn.out_proj.\2', None),
        (rf'{s}\.(\d+)\.mlp\.fc1\.(weight|bias)', rf'{d}.\1.ffn.layers.0.0.\2',
         None),
        (rf'{s}\.(\d+)\.mlp\.fc2\.(weight|bias)', rf'{d}.\1.ffn.layers.1.\2',
         None),
    ]


def _vit_shape(state: StateDict, prefix: str = '') -> Dict[str, int]:
    """Architecture numbers of a timm-layout ViT read from its tensors."""
    try:
        pos = state[f'{prefix}pos_embed']
    except KeyError:
        raise KeyError(f'missing tensor {prefix}pos_embed: not a ViT checkpoint')
    embed_dims = int(pos.shape[-1])
    layers = {
        int(k[len(prefix):].split('.')[1])
        for k in state if k.startswith(f'{prefix}blocks.')
    }
    if not layers or layers != set(range(len(layers))):
        raise KeyError(f'transformer blocks {sorted(layers)}: some are missing')
    grid = int(round(math.sqrt(pos.shape[1] - 1)))
    if grid * grid + 1 != pos.shape[1]:
        raise ValueError(f'{prefix}pos_embed of shape {tuple(pos.shape)}: not a '
                         'square grid plus one class token')
    conv_stem = any(k.startswith(f'{prefix}patch_embed.proj.stem.') for k in state)
    if conv_stem:
        patch = 16
    else:
        key = f'{prefix}patch_embed.proj.weight'
        if key not in state:
            raise KeyError(f'missing tensor {key}')
        patch = int(state[key].shape[-1])
    return dict(
        embed_dims=embed_dims,
        num_layers=len(layers),
        grid=grid,
        patch_size=patch,
        conv_stem=int(conv_stem))


def vit_for(shape: Dict[str, int], num_heads: Optional[int] = None,
            **kwargs) -> VisionTransformerStrict:
    """The :class:`VisionTransformerStrict` matching :func:`_vit_shape`."""
    size = shape['grid'] * shape['patch_size']
    return VisionTransformerStrict(
        stem='conv' if shape['conv_stem'] else 'patch',
        img_size=(size, size),
        patch_size=shape['patch_size'],
        embed_dims=shape['embed_dims'],
        num_layers=shape['num_layers'],
        num_heads=num_heads or max(shape['embed_dims'] // 64, 1),
        final_norm=True,
        with_cls_token=True,
        **kwargs)


def convert_revisiting_at_vit(state_dict: StateDict,
                              num_heads: Optional[int] = None
                              ) -> Tuple[StateDict, dict]:
    """revisiting-at / timm ViT -> mmseg ``VisionTransformer`` state dict.

    ``pos_embed`` keeps its grid (14x14 for 224 px); ``VisionTransformerStrict``
    (and mmseg's VisionTransformer) resize it to the config's ``img_size`` when
    loading. The convolutional stem of ViT-S-CvSt is converted too (load it with
    ``VisionTransformerStrict(stem='conv')``).

    Args:
        state_dict (dict): the source tensors (prefixes allowed).
        num_heads (int, optional): only used to build the reference layout
            (shapes do not depend on it). Default: ``embed_dims // 64``.

    Returns:
        tuple: ``(state dict, meta)``.
    """
    state = strip_prefixes(state_dict, WRAPPER_PREFIXES)
    shape = _vit_shape(state)
    rules = NORMALIZER + [
        (r'head\.(weight|bias)', None, None),
        (r'cls_token', 'cls_token', None),
        (r'pos_embed', 'pos_embed', None),
        (r'patch_embed\.proj\.(weight|bias)', r'patch_embed.projection.\1', None),
        (r'patch_embed\.proj\.stem\.(\d+)\.(weight|bias)',
         r'patch_embed.projection.\1.\2', None),
        (r'norm\.(weight|bias)', r'ln1.\1', None),
    ] + timm_vit_block_rules('blocks', 'layers')
    out, dropped = apply_rules(state, rules, 'revisiting-at ViT checkpoint')
    expected = expected_layout(vit_for(shape, num_heads))
    check_converted(out, expected, 'converted ViT backbone')
    meta = dict(
        arch=f"ViT d={shape['embed_dims']} L={shape['num_layers']} "
        f"patch={shape['patch_size']}",
        stem='conv' if shape['conv_stem'] else 'patch',
        pos_embed_grid=shape['grid'],
        dropped=dropped)
    return out, meta
