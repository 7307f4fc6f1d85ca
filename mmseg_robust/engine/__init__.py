"""Thin glue to mmengine: adversarial loops, presets, result cache."""
from .adversarial_loops import (AdversarialTestLoop, AdversarialValLoop,
                                image_seed)
from .adversarial_training import (AdversarialTrainLoop, DDCATTrainLoop,
                                   PIRATTrainLoop, SATTrainLoop)
from .attack_context import attack_context
from .optim_wrappers import AdversarialAmpOptimWrapper, AdversarialOptimWrapper
from .random_state import RandomStateHook
from .train_schemes import DDCATScheme, PIRATScheme, SATScheme, TrainScheme
from .presets import (EVALUATOR_PRESETS, add_adversarial_visualization,
                      apply_robustness_evaluator, dataset_class_weights,
                      is_robustness_evaluation, normalize_evaluator_options)
from .result_cache import ResultCache, fingerprint
from .visualization_hook import AdversarialVisualizationHook

__all__ = [
    'AdversarialAmpOptimWrapper', 'AdversarialOptimWrapper',
    'AdversarialTestLoop', 'AdversarialTrainLoop', 'AdversarialValLoop',
    'AdversarialVisualizationHook',
    'DDCATScheme', 'DDCATTrainLoop', 'PIRATScheme', 'PIRATTrainLoop',
    'SATScheme', 'SATTrainLoop', 'TrainScheme', 'attack_context',
    'EVALUATOR_PRESETS', 'RandomStateHook',
    'ResultCache', 'add_adversarial_visualization',
    'apply_robustness_evaluator', 'dataset_class_weights',
    'is_robustness_evaluation', 'normalize_evaluator_options',
    'fingerprint', 'image_seed'
]
