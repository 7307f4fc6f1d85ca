"""Evaluation arithmetic (per-image counts, worst-case aggregation) and metrics."""
from .counts import (COUNT_KEYS, miou_from_counts, per_image_counts,
                     pixel_accuracy, pooled_metrics)
from .worst_case import (WORST_CASE_MIOU_MODES, worst_case_aacc,
                         worst_case_miou)

__all__ = [
    'COUNT_KEYS', 'WORST_CASE_MIOU_MODES', 'miou_from_counts',
    'per_image_counts', 'pixel_accuracy', 'pooled_metrics', 'worst_case_aacc',
    'worst_case_miou'
]
