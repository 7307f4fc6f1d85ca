"""Checkpoint converters (docs/algorithms.md section 8): revisiting-at robust ImageNet
backbones to backbone-init checkpoints, the released Robust-Segmentation models and
the DDC-AT / SAT reference checkpoints to full mmseg checkpoints, and the export of a
DDC-AT model as the plain segmentor it deploys as. Each maps every tensor by an
explicit rule and checks the result against the target model's layout
(:mod:`mmseg_robust.models.checkpoint`); the command lines are in
``tools/model_converters/`` and share :mod:`.cli`."""

from .ddcat_export import export_plain_state_dict, plain_head_cfg, plain_model_cfg
from .revisiting_at import convert_revisiting_at_convnext, convert_revisiting_at_vit
from .robust_segmentation import (
    build_target_model,
    convert_robust_segmentation_segmenter,
    convert_robust_segmentation_upernet,
)
from .semseg import SemsegLayout, convert_semseg_state_dict, detect_semseg_layout

__all__ = [
    'SemsegLayout',
    'build_target_model',
    'convert_revisiting_at_convnext',
    'convert_revisiting_at_vit',
    'convert_robust_segmentation_segmenter',
    'convert_robust_segmentation_upernet',
    'convert_semseg_state_dict',
    'detect_semseg_layout',
    'export_plain_state_dict',
    'plain_head_cfg',
    'plain_model_cfg',
]
