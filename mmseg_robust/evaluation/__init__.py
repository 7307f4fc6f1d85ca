"""Evaluation arithmetic (per-image counts, worst-case aggregation) and metrics."""

from .corruption_metric import (
    CorruptionMetric,
    flatten_corruption_summary,
    format_corruption_summary,
    summarize_corruptions,
)
from .counts import (
    miou_from_counts,
    per_image_counts,
    pixel_accuracy,
    pooled_metrics,
)
from .evaluator import (
    BatchResult,
    Example,
    ImageCounts,
    ImageRecord,
    RobustnessEvaluator,
    image_seed,
)
from .results import RobustnessResults, load_results, results_filename, write_results
from .robustness_metric import (
    RobustnessMetric,
    counts_of_batch,
    eps_key,
    flatten_summary,
    format_summary,
    image_record,
    summarize_records,
)
from .self_checks import Flag, SelfCheckError
from .worst_case import WORST_CASE_MIOU_MODES, worst_case_aacc, worst_case_miou

__all__ = [
    'CorruptionMetric',
    'flatten_corruption_summary',
    'format_corruption_summary',
    'summarize_corruptions',
    'BatchResult',
    'Example',
    'ImageCounts',
    'ImageRecord',
    'RobustnessEvaluator',
    'image_seed',
    'Flag',
    'SelfCheckError',
    'RobustnessMetric',
    'RobustnessResults',
    'WORST_CASE_MIOU_MODES',
    'counts_of_batch',
    'eps_key',
    'load_results',
    'results_filename',
    'write_results',
    'flatten_summary',
    'format_summary',
    'image_record',
    'miou_from_counts',
    'summarize_records',
    'per_image_counts',
    'pixel_accuracy',
    'pooled_metrics',
    'worst_case_aacc',
    'worst_case_miou',
]
