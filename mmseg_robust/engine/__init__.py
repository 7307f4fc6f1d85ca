"""Thin glue to mmengine: adversarial loops, training schemes, presets, result
cache."""

from .adversarial_loops import AdversarialTestLoop, AdversarialValLoop, image_seed
from .adversarial_training import AdversarialTrainLoop
from .attack_context import attack_context
from .checkpoint_check import CheckpointCheckHook, check_loaded_checkpoint
from .corruption_loop import CorruptionTestLoop
from .presets import (
    EVALUATOR_PRESETS,
    add_adversarial_visualization,
    apply_robustness_evaluator,
    configure_test,
    dataset_class_weights,
    is_corruption_evaluation,
    is_robustness_evaluation,
    load_evaluator_preset,
    normalize_evaluator_options,
)
from .random_state import RandomStateHook
from .result_cache import ResultCache, fingerprint
from .resume import ResumeCheckHook, configure_resume
from .train_schemes import DDCATScheme, PIRATScheme, SATScheme, TrainScheme
from .visualization_hook import AdversarialVisualizationHook

__all__ = [
    'CorruptionTestLoop',
    'AdversarialTestLoop',
    'AdversarialTrainLoop',
    'AdversarialValLoop',
    'AdversarialVisualizationHook',
    'CheckpointCheckHook',
    'DDCATScheme',
    'EVALUATOR_PRESETS',
    'PIRATScheme',
    'RandomStateHook',
    'ResultCache',
    'ResumeCheckHook',
    'SATScheme',
    'TrainScheme',
    'add_adversarial_visualization',
    'apply_robustness_evaluator',
    'attack_context',
    'check_loaded_checkpoint',
    'configure_resume',
    'configure_test',
    'dataset_class_weights',
    'fingerprint',
    'image_seed',
    'is_corruption_evaluation',
    'is_robustness_evaluation',
    'load_evaluator_preset',
    'normalize_evaluator_options',
]
