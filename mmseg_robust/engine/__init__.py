"""Thin glue to mmengine: adversarial loops, presets, result cache."""
from .adversarial_loops import (AdversarialTestLoop, AdversarialValLoop,
                                image_seed)
from .adversarial_training import (AdversarialTrainLoop, RandomStateHook,
                                   TrainPixelView)
from .optim_wrappers import (AdversarialAmpOptimWrapper,
                             AdversarialOptimWrapper, AttackContextMixin)
from .presets import (EVALUATOR_PRESETS, apply_robustness_evaluator,
                      dataset_class_weights)
from .result_cache import ResultCache, fingerprint

__all__ = [
    'AdversarialAmpOptimWrapper', 'AdversarialOptimWrapper',
    'AdversarialTestLoop', 'AdversarialTrainLoop', 'AdversarialValLoop',
    'AttackContextMixin', 'EVALUATOR_PRESETS', 'RandomStateHook',
    'TrainPixelView',
    'ResultCache', 'apply_robustness_evaluator', 'dataset_class_weights',
    'fingerprint', 'image_seed'
]
