"""Thin glue to mmengine: adversarial loops, presets, result cache."""
from .adversarial_loops import (AdversarialTestLoop, AdversarialValLoop,
                                image_seed)
from .presets import (EVALUATOR_PRESETS, apply_robustness_evaluator,
                      dataset_class_weights)
from .result_cache import ResultCache, fingerprint

__all__ = [
    'AdversarialTestLoop', 'AdversarialValLoop', 'EVALUATOR_PRESETS',
    'ResultCache', 'apply_robustness_evaluator', 'dataset_class_weights',
    'fingerprint', 'image_seed'
]
