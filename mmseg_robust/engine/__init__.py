"""Thin glue to mmengine: adversarial loops, presets, result cache."""
from .adversarial_loops import (AdversarialTestLoop, AdversarialValLoop,
                                image_seed)
from .adversarial_training import AdversarialTrainLoop
from .optim_wrappers import (AdversarialAmpOptimWrapper,
                             AdversarialOptimWrapper, AttackContextMixin)
from .random_state import RandomStateHook
from .checkpoint_check import CheckpointCheckHook, check_loaded_checkpoint
from .presets import (EVALUATOR_PRESETS, add_adversarial_visualization,
                      apply_robustness_evaluator, configure_test,
                      dataset_class_weights, is_robustness_evaluation,
                      load_evaluator_preset, normalize_evaluator_options)
from .result_cache import ResultCache, fingerprint
from .visualization_hook import AdversarialVisualizationHook

__all__ = [
    'AdversarialAmpOptimWrapper', 'AdversarialOptimWrapper',
    'AdversarialTestLoop', 'AdversarialTrainLoop', 'AdversarialValLoop',
    'AdversarialVisualizationHook',
    'AttackContextMixin', 'CheckpointCheckHook', 'EVALUATOR_PRESETS',
    'RandomStateHook', 'check_loaded_checkpoint', 'configure_test',
    'load_evaluator_preset',
    'ResultCache', 'add_adversarial_visualization',
    'apply_robustness_evaluator', 'dataset_class_weights',
    'is_robustness_evaluation', 'normalize_evaluator_options',
    'fingerprint', 'image_seed'
]
