"""Checkpoint converters (docs/algorithms.md section 7): revisiting-at robust ImageNet
backbones to backbone-init checkpoints, and the released Robust-Segmentation models
to full mmseg checkpoints. Each maps every tensor by an explicit rule and checks the
result against the target model's layout; the CLIs are in
``tools/model_converters/``."""
from .common import load_source_checkpoint, save_checkpoint, unwrap_state_dict
from .revisiting_at import (convert_revisiting_at_convnext,
                            convert_revisiting_at_vit)
from .robust_segmentation import (build_target_model,
                                  convert_robust_segmentation_segmenter,
                                  convert_robust_segmentation_upernet)

__all__ = [
    'build_target_model', 'convert_revisiting_at_convnext',
    'convert_revisiting_at_vit', 'convert_robust_segmentation_segmenter',
    'convert_robust_segmentation_upernet', 'load_source_checkpoint',
    'save_checkpoint', 'unwrap_state_dict'
]
