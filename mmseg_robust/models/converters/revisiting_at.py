"""Converters for the robust ImageNet backbones of revisiting-at (Singh, Croce &
Hein, NeurIPS 2023) into PIR-AT backbone-init checkpoints (docs/algorithms.md sections
5.1 and 7).

Source layouts (timm naming, possibly under ``module.`` / ``base_model.`` /
``model.`` prefixes, with the input normaliser ``normalize.{mean,std}``):

- ConvNeXt-CvSt: ``stem.stem.{0,1,3,4}``, ``stages.{1,2,3}.downsample.{0,1}``,
  ``stages.j.blocks.k.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}``, ``head.*``.
- ViT: ``cls_token``, ``pos_embed``, ``patch_embed.proj`` (or the convolutional
  stem ``patch_embed.proj.stem.i`` of ViT-S-CvSt), ``blocks.i.{norm1, attn.qkv,
  attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``.

The classifier head is dropped. The input normaliser ``normalize.{mean,std}``
(revisiting-at's classifiers see ``(x - mean) / std`` of [0, 1] images) is dropped
only when that is harmless or asked for, since our models take raw [0, 1] images
(the configs' data preprocessor only divides by 255, section 5.1). An identity
normaliser (mean 0, std 1), or none, is dropped silently; any other one raises,
naming its values, unless the converter is called with ``drop_normalizer=True``.
That drops it as the PIR-AT reference does (docs/algorithms.md section 8; the whole
network is then fine-tuned on raw [0, 1] input) and records its values in
``meta['input_normalizer']``, for a config that gives the backbone its training
input instead: data preprocessor ``mean = 255 * m``, ``std = 255 * s`` (RGB,
``bgr_to_rgb=True``).
"""

import math
from typing import Dict, List, Optional, Tuple, Union

import torch

from mmseg_robust.models.backbones import ConvNeXtCvSt, VisionTransformerStrict
from mmseg_robust.models.checkpoint import (
    CheckpointError,
    check_state_dict,
    expected_shapes,
)

from .common import StateDict, apply_rules, convnext_arch_of, strip_prefixes

__all__ = [
    'convert_revisiting_at_convnext',
    'convert_revisiting_at_vit',
    'take_normalizer',
    'timm_vit_block_rules',
]

WRAPPER_PREFIXES = ('module.', 'base_model.', 'model.')
# Dropped by the rules once take_normalizer has accepted its values.
NORMALIZER = [(r'normalize\.(mean|std)', None, None)]


def _values(tensor: Optional[torch.Tensor], identity: float) -> List[float]:
    if tensor is None:
        return [identity] * 3
    return [round(float(v), 6) for v in tensor.detach().float().flatten()]


def take_normalizer(
    state: StateDict, drop_normalizer: bool, what: str
) -> Optional[dict]:
    """Check the source's input normaliser ``normalize.{mean,std}``.

    Args:
        state (dict): the source tensors, wrapper prefixes removed.
        drop_normalizer (bool): accept a non-identity normaliser (it is dropped).
        what (str): the checkpoint kind, for the message.

    Returns:
        dict | None: ``dict(mean=[...], std=[...])`` of a non-identity
        normaliser accepted with ``drop_normalizer=True``; None when there is
        none or it is the identity.

    Raises:
        CheckpointError: a non-identity normaliser without ``drop_normalizer``: the
            message names its values and what to do.
    """
    mean, std = state.get('normalize.mean'), state.get('normalize.std')
    if mean is None and std is None:
        return None
    values = dict(mean=_values(mean, 0.0), std=_values(std, 1.0))
    identity = (mean is None or bool((mean == 0).all())) and (
        std is None or bool((std == 1).all())
    )
    if identity:
        return None
    if not drop_normalizer:
        pre_mean = [round(255 * m, 3) for m in values['mean']]
        pre_std = [round(255 * s, 3) for s in values['std']]
        raise CheckpointError(
            f'{what} has an input normaliser normalize.mean={values["mean"]}, '
            f'normalize.std={values["std"]}: the network was trained on '
            '(x - mean) / std of [0, 1] images, while our models feed it raw '
            '[0, 1] images. Converting drops the normaliser; to accept that, '
            'convert with drop_normalizer=True and either keep raw [0, 1] input '
            '(as PIR-AT does, fine-tuning the whole network) or give the backbone '
            'its training input with the data preprocessor '
            f'mean={pre_mean}, std={pre_std} (255 x the values; RGB, '
            'bgr_to_rgb=True).'
        )
    return values


def convert_revisiting_at_convnext(
    state_dict: StateDict,
    arch: Optional[Union[str, dict]] = None,
    drop_normalizer: bool = False,
) -> Tuple[StateDict, dict]:
    """revisiting-at ConvNeXt-CvSt (timm naming) -> :class:`ConvNeXtCvSt` state dict.

    The per-stage output norms ``norm0..norm3`` do not exist in a classifier; they
    are written as identity LayerNorms (weight 1, bias 0), the initialisation the
    reference segmentation model gives them, so that the file loads strictly.

    Args:
        state_dict (dict): the source tensors (prefixes allowed).
        arch (str | dict, optional): expected architecture (``'tiny'``,
            ``'small'``, ...); inferred from the blocks when None, and checked.
        drop_normalizer (bool): accept (and drop) an input normaliser other
            than the identity (see the module docstring). Default: False.

    Returns:
        tuple: ``(state dict of ConvNeXtCvSt, meta)`` with ``meta`` listing the
        architecture, the dropped source tensors and the fresh ones, plus
        ``input_normalizer`` (``dict(mean, std)``) when one was accepted.

    Raises:
        CheckpointError: a tensor of an unknown layout, or a missing or
            wrongly shaped one, named in the message; a non-identity normaliser
            without ``drop_normalizer``.
    """
    state = strip_prefixes(state_dict, WRAPPER_PREFIXES)
    normalizer = take_normalizer(
        state, drop_normalizer, 'revisiting-at ConvNeXt checkpoint'
    )
    inferred = convnext_arch_of(
        state,
        'stages.{j}.blocks.',
        'stages.{j}.blocks.0.conv_dw.weight',
        'timm ConvNeXt',
    )
    if arch is not None and arch != inferred:
        raise CheckpointError(f'the checkpoint is ConvNeXt {inferred}, not {arch}')
    rules = NORMALIZER + [
        (r'head\..*', None, None),
        (r'stem\.stem\.([0134])\.(weight|bias)', r'downsample_layers.0.\1.\2', None),
        (
            r'stages\.([123])\.downsample\.([01])\.(weight|bias)',
            r'downsample_layers.\1.\2.\3',
            None,
        ),
        (
            r'stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(weight|bias)',
            r'stages.\1.\2.depthwise_conv.\3',
            None,
        ),
        (
            r'stages\.(\d+)\.blocks\.(\d+)\.norm\.(weight|bias)',
            r'stages.\1.\2.norm.\3',
            None,
        ),
        (
            r'stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)',
            r'stages.\1.\2.pointwise_conv1.\3',
            None,
        ),
        (
            r'stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)',
            r'stages.\1.\2.pointwise_conv2.\3',
            None,
        ),
        (r'stages\.(\d+)\.blocks\.(\d+)\.gamma', r'stages.\1.\2.gamma', None),
    ]
    out, dropped = apply_rules(state, rules, 'revisiting-at ConvNeXt checkpoint')
    model = ConvNeXtCvSt(arch=inferred)
    expected = expected_shapes(model)
    fresh = []
    for i in range(4):
        for name, value in (('weight', 1.0), ('bias', 0.0)):
            key = f'norm{i}.{name}'
            if key in out:
                raise CheckpointError(f'{key} should not be in a classifier checkpoint')
            out[key] = torch.full(expected[key], value)
            fresh.append(key)
    check_state_dict(out, expected, what='the converted ConvNeXt-CvSt backbone')
    meta = dict(
        arch=inferred if isinstance(inferred, str) else str(inferred),
        dropped=dropped,
        fresh=fresh,
    )
    if normalizer is not None:
        meta['input_normalizer'] = normalizer
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
        (
            rf'{s}\.(\d+)\.attn\.qkv\.(weight|bias)',
            rf'{d}.\1.attn.attn.in_proj_\2',
            None,
        ),
        (
            rf'{s}\.(\d+)\.attn\.proj\.(weight|bias)',
            rf'{d}.\1.attn.attn.out_proj.\2',
            None,
        ),
        (rf'{s}\.(\d+)\.mlp\.fc1\.(weight|bias)', rf'{d}.\1.ffn.layers.0.0.\2', None),
        (rf'{s}\.(\d+)\.mlp\.fc2\.(weight|bias)', rf'{d}.\1.ffn.layers.1.\2', None),
    ]


def _vit_shape(state: StateDict, prefix: str = '') -> Dict[str, int]:
    """Architecture numbers of a timm-layout ViT read from its tensors."""
    try:
        pos = state[f'{prefix}pos_embed']
    except KeyError:
        raise CheckpointError(
            f'missing tensor {prefix}pos_embed: not a ViT checkpoint'
        ) from None
    embed_dims = int(pos.shape[-1])
    layers = {
        int(k[len(prefix) :].split('.')[1])
        for k in state
        if k.startswith(f'{prefix}blocks.')
    }
    if not layers or layers != set(range(len(layers))):
        raise CheckpointError(f'transformer blocks {sorted(layers)}: some are missing')
    grid = int(round(math.sqrt(pos.shape[1] - 1)))
    if grid * grid + 1 != pos.shape[1]:
        raise CheckpointError(
            f'{prefix}pos_embed of shape {tuple(pos.shape)}: not a '
            'square grid plus one class token'
        )
    conv_stem = any(k.startswith(f'{prefix}patch_embed.proj.stem.') for k in state)
    if conv_stem:
        patch = 16
    else:
        key = f'{prefix}patch_embed.proj.weight'
        if key not in state:
            raise CheckpointError(f'missing tensor {key}')
        patch = int(state[key].shape[-1])
    return dict(
        embed_dims=embed_dims,
        num_layers=len(layers),
        grid=grid,
        patch_size=patch,
        conv_stem=int(conv_stem),
    )


def vit_for(
    shape: Dict[str, int], num_heads: Optional[int] = None, **kwargs
) -> VisionTransformerStrict:
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
        **kwargs,
    )


def convert_revisiting_at_vit(
    state_dict: StateDict,
    num_heads: Optional[int] = None,
    drop_normalizer: bool = False,
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
        drop_normalizer (bool): accept (and drop) an input normaliser other
            than the identity (see the module docstring). Default: False.

    Returns:
        tuple: ``(state dict, meta)``; ``meta['input_normalizer']``
        (``dict(mean, std)``) when a normaliser was accepted.

    Raises:
        CheckpointError: as :func:`convert_revisiting_at_convnext`.
    """
    state = strip_prefixes(state_dict, WRAPPER_PREFIXES)
    normalizer = take_normalizer(state, drop_normalizer, 'revisiting-at ViT checkpoint')
    shape = _vit_shape(state)
    rules = (
        NORMALIZER
        + [
            (r'head\.(weight|bias)', None, None),
            (r'cls_token', 'cls_token', None),
            (r'pos_embed', 'pos_embed', None),
            (r'patch_embed\.proj\.(weight|bias)', r'patch_embed.projection.\1', None),
            (
                r'patch_embed\.proj\.stem\.(\d+)\.(weight|bias)',
                r'patch_embed.projection.\1.\2',
                None,
            ),
            (r'norm\.(weight|bias)', r'ln1.\1', None),
        ]
        + timm_vit_block_rules('blocks', 'layers')
    )
    out, dropped = apply_rules(state, rules, 'revisiting-at ViT checkpoint')
    expected = expected_shapes(vit_for(shape, num_heads))
    check_state_dict(out, expected, what='the converted ViT backbone')
    meta = dict(
        arch=f'ViT d={shape["embed_dims"]} L={shape["num_layers"]} '
        f'patch={shape["patch_size"]}',
        stem='conv' if shape['conv_stem'] else 'patch',
        pos_embed_grid=shape['grid'],
        dropped=dropped,
    )
    if normalizer is not None:
        meta['input_normalizer'] = normalizer
    return out, meta
