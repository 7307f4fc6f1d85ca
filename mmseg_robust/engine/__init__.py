"""Thin glue to mmengine: adversarial loops, presets, result cache."""
from .adversarial_loops import (AdversarialTestLoop, AdversarialValLoop,
                                image_seed)
from .adversarial_training import AdversarialTrainLoop
from .optim_wrappers import (AdversarialAmpOptimWrapper,
                             AdversarialOptimWrapper, AttackContextMixin)
from .random_state import RandomStateHook
from .presets import (EVALUATOR_PRESETS, add_adversarial_visualization,
                      apply_robustness_evaluator, dataset_class_weights,
                      is_robustness_evaluation, normalize_evaluator_options)
from .result_cache import ResultCache, fingerprint
from .visualization_hook import AdversarialVisualizationHook

__all__ = [
    'AdversarialAmpOptimWrapper', 'AdversarialOptimWrapper',
    'AdversarialTestLoop', 'AdversarialTrainLoop', 'AdversarialValLoop',
    'AdversarialVisualizationHook',
    'AttackContextMixin', 'EVALUATOR_PRESETS', 'RandomStateHook',
    'ResultCache', 'add_adversarial_visualization',
    'apply_robustness_evaluator', 'dataset_class_weights',
    'is_robustness_evaluation', 'normalize_evaluator_options',
    'fingerprint', 'image_seed'
]
