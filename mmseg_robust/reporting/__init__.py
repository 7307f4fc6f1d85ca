"""Reports of robustness evaluations: results tables, JSON/Markdown reports,
robustness curves and picture grids of adversarial examples.

Needs only numpy and matplotlib (no torch, no mmengine, no pyplot).
"""

from .pictures import (
    amplified_perturbation,
    colorize,
    image_miou,
    load_example,
    save_example,
    save_picture_grid,
)
from .report import (
    evaluation_budget,
    format_flags,
    format_table,
    load_result,
    plot_robustness_curve,
    shared_settings,
    write_report,
)

__all__ = [
    'amplified_perturbation',
    'colorize',
    'evaluation_budget',
    'format_flags',
    'format_table',
    'image_miou',
    'load_example',
    'load_result',
    'plot_robustness_curve',
    'save_example',
    'save_picture_grid',
    'shared_settings',
    'write_report',
]
