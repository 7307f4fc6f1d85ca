"""Converters for the released Robust-Segmentation models (Croce, Singh & Hein, ECCV
2024: PIR-AT UperNet-ConvNeXt-T/S-CvSt and Segmenter ViT-S) into full mmseg
checkpoints (docs/algorithms.md section 8).

Source layouts (plain state dicts; the models take raw [0, 1] images):

- UperNet: ``backbone.downsample_layers.0.stem.{0,1,3,4}``,
  ``backbone.downsample_layers.{1,2,3}.{0,1}``, ``backbone.stages.s.b.{gamma,
  dwconv, norm, pwconv1, pwconv2}``, ``backbone.norm{0..3}``,
  ``decode_head.{psp_modules.i.1, bottleneck, lateral_convs.i, fpn_convs.i,
  fpn_bottleneck}.{conv.weight, batch_norm.*}``, ``decode_head.classifier``,
  ``auxiliary_head.convs.0.{conv, batch_norm}``, ``auxiliary_head.classifier``.
- Segmenter: ``encoder.*`` (timm ViT with the patchify stem), ``decoder.{cls_emb,
  proj_dec, proj_patch, proj_classes, blocks.i, decoder_norm, mask_norm}``.

The target layout is the model of an mmseg config (e.g.
``configs/_base_/models/upernet_convnext_cvst.py``), built on CPU with the
architecture and class count read from the checkpoint, so the output loads
strictly into exactly that model.
"""

import copy
from typing import Tuple

import torch
from mmengine.config import ConfigDict
from mmengine.registry import init_default_scope

from mmseg_robust.models.checkpoint import (
    CheckpointError,
    check_state_dict,
    expected_shapes,
)
from mmseg_robust.registry import MODELS

from .common import StateDict, apply_rules, convnext_arch_of, strip_prefixes
from .revisiting_at import _vit_shape, timm_vit_block_rules

__all__ = [
    'convert_robust_segmentation_segmenter',
    'convert_robust_segmentation_upernet',
    'build_target_model',
]

BN = r'(weight|bias|running_mean|running_var|num_batches_tracked)'


def build_target_model(model_cfg: dict) -> torch.nn.Module:
    """Build the mmseg segmentor of ``model_cfg`` on CPU, without pretrained init."""
    init_default_scope('mmseg')
    import mmseg_robust.models.backbones  # noqa: F401  (registers our backbones)

    cfg = copy.deepcopy(dict(model_cfg))
    cfg['pretrained'] = None
    if isinstance(cfg.get('backbone'), dict):
        cfg['backbone'] = dict(cfg['backbone'], init_cfg=None)
    return MODELS.build(ConfigDict(cfg))


def _set_classes(cfg: dict, num_classes: int) -> None:
    for head in ('decode_head', 'auxiliary_head'):
        heads = cfg.get(head)
        for h in heads if isinstance(heads, list) else [heads]:
            if isinstance(h, dict):
                h['num_classes'] = num_classes


# The ConvModules of the heads: the reference's ``X.conv`` (no bias) and
# ``X.batch_norm`` are mmcv's ``X.conv`` and ``X.bn`` at the same module path.
CONV_MODULES = (
    r'(decode_head\.(?:psp_modules\.\d+\.1|lateral_convs\.\d+|'
    r'fpn_convs\.\d+|bottleneck|fpn_bottleneck)|auxiliary_head\.convs\.0)'
)


def convert_robust_segmentation_upernet(
    state_dict: StateDict, model_cfg: dict
) -> Tuple[StateDict, dict]:
    """Robust-Segmentation UperNet-ConvNeXt-CvSt -> mmseg EncoderDecoder state dict.

    Args:
        state_dict (dict): the source tensors (a ``module.`` prefix is allowed).
        model_cfg (dict): the mmseg model config to convert to (UperHead + FCNHead
            on ``ConvNeXtCvSt``); its ``backbone.arch`` and the heads'
            ``num_classes`` are set from the checkpoint.

    Returns:
        tuple: ``(state dict, meta)``; meta has ``arch`` and ``num_classes``.

    Raises:
        CheckpointError: unknown, missing or wrongly shaped tensors, named.
    """
    state = strip_prefixes(state_dict, ('module.',))
    arch = convnext_arch_of(
        state,
        'backbone.stages.{j}.',
        'backbone.stages.{j}.0.dwconv.weight',
        'Robust-Segmentation ConvNeXt',
    )
    key = 'decode_head.classifier.weight'
    if key not in state:
        raise CheckpointError(f'missing tensor {key}')
    num_classes = int(state[key].shape[0])
    rules = [
        (
            r'backbone\.downsample_layers\.0\.stem\.([0134])\.(weight|bias)',
            r'backbone.downsample_layers.0.\1.\2',
            None,
        ),
        (
            r'backbone\.downsample_layers\.([123])\.([01])\.(weight|bias)',
            r'backbone.downsample_layers.\1.\2.\3',
            None,
        ),
        (
            r'backbone\.stages\.(\d+)\.(\d+)\.dwconv\.(weight|bias)',
            r'backbone.stages.\1.\2.depthwise_conv.\3',
            None,
        ),
        (
            r'backbone\.stages\.(\d+)\.(\d+)\.norm\.(weight|bias)',
            r'backbone.stages.\1.\2.norm.\3',
            None,
        ),
        (
            r'backbone\.stages\.(\d+)\.(\d+)\.pwconv1\.(weight|bias)',
            r'backbone.stages.\1.\2.pointwise_conv1.\3',
            None,
        ),
        (
            r'backbone\.stages\.(\d+)\.(\d+)\.pwconv2\.(weight|bias)',
            r'backbone.stages.\1.\2.pointwise_conv2.\3',
            None,
        ),
        (
            r'backbone\.stages\.(\d+)\.(\d+)\.gamma',
            r'backbone.stages.\1.\2.gamma',
            None,
        ),
        (r'backbone\.norm([0-3])\.(weight|bias)', r'backbone.norm\1.\2', None),
        (r'decode_head\.classifier\.(weight|bias)', r'decode_head.conv_seg.\1', None),
        (
            r'auxiliary_head\.classifier\.(weight|bias)',
            r'auxiliary_head.conv_seg.\1',
            None,
        ),
    ]
    rules += [
        (CONV_MODULES + r'\.conv\.weight', r'\1.conv.weight', None),
        (CONV_MODULES + r'\.batch_norm\.' + BN, r'\1.bn.\2', None),
    ]
    out, dropped = apply_rules(state, rules, 'Robust-Segmentation UperNet checkpoint')
    cfg = copy.deepcopy(dict(model_cfg))
    cfg['backbone'] = dict(cfg['backbone'], arch=arch)
    _set_classes(cfg, num_classes)
    expected = expected_shapes(build_target_model(cfg))
    check_state_dict(out, expected, what='the converted UperNet-ConvNeXt-CvSt')
    meta = dict(
        arch=arch if isinstance(arch, str) else str(arch),
        num_classes=num_classes,
        dropped=dropped,
    )
    return out, meta


def convert_robust_segmentation_segmenter(
    state_dict: StateDict, model_cfg: dict
) -> Tuple[StateDict, dict]:
    """Robust-Segmentation Segmenter (ViT + mask transformer) -> mmseg
    EncoderDecoder with ``VisionTransformer(Strict)`` and
    ``SegmenterMaskTransformerHead``.

    The reference multiplies by ``proj_patch``/``proj_classes`` (``x @ P``); mmseg
    uses bias-free ``nn.Linear`` (``x @ W.T``), so they are transposed. The
    encoder's unused ImageNet classifier (``encoder.head``) is dropped.

    Args:
        state_dict (dict): the source tensors (a ``module.`` prefix is allowed).
        model_cfg (dict): the mmseg model config; the heads' ``num_classes`` are
            set from the checkpoint. Its ``backbone.img_size`` must match the
            checkpoint's position-embedding grid (512 px for the released model).

    Returns:
        tuple: ``(state dict, meta)``.
    """
    state = strip_prefixes(state_dict, ('module.',))
    shape = _vit_shape(state, 'encoder.')
    key = 'decoder.cls_emb'
    if key not in state:
        raise CheckpointError(f'missing tensor {key}')
    num_classes = int(state[key].shape[1])

    def transpose(t):
        return t.t().contiguous()

    rules = [
        (r'encoder\.head\.(weight|bias)', None, None),
        (r'encoder\.cls_token', 'backbone.cls_token', None),
        (r'encoder\.pos_embed', 'backbone.pos_embed', None),
        (
            r'encoder\.patch_embed\.proj\.(weight|bias)',
            r'backbone.patch_embed.projection.\1',
            None,
        ),
        (r'encoder\.norm\.(weight|bias)', r'backbone.ln1.\1', None),
        (r'decoder\.cls_emb', 'decode_head.cls_emb', None),
        (r'decoder\.proj_dec\.(weight|bias)', r'decode_head.dec_proj.\1', None),
        (r'decoder\.proj_patch', 'decode_head.patch_proj.weight', transpose),
        (r'decoder\.proj_classes', 'decode_head.classes_proj.weight', transpose),
        (r'decoder\.decoder_norm\.(weight|bias)', r'decode_head.decoder_norm.\1', None),
        (r'decoder\.mask_norm\.(weight|bias)', r'decode_head.mask_norm.\1', None),
    ]
    rules += timm_vit_block_rules('encoder.blocks', 'backbone.layers')
    rules += timm_vit_block_rules('decoder.blocks', 'decode_head.layers')
    out, dropped = apply_rules(state, rules, 'Robust-Segmentation Segmenter checkpoint')
    cfg = copy.deepcopy(dict(model_cfg))
    _set_classes(cfg, num_classes)
    expected = expected_shapes(build_target_model(cfg))
    check_state_dict(
        out,
        expected,
        what=f'the converted Segmenter (checkpoint pos_embed grid '
        f'{shape["grid"]}x'
        f'{shape["grid"]}, patch {shape["patch_size"]})',
    )
    meta = dict(
        arch=f'Segmenter ViT d={shape["embed_dims"]} L={shape["num_layers"]}',
        num_classes=num_classes,
        pos_embed_grid=shape['grid'],
        dropped=dropped,
    )
    return out, meta
