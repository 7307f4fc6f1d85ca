"""Reports of robustness evaluations: results tables, JSON/Markdown reports,
robustness curves, corruption heat maps and severity curves, and picture
grids of adversarial examples.

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
    corruption_budget,
    evaluation_budget,
    format_corruption_details,
    format_corruption_table,
    format_flags,
    format_overview_table,
    format_table,
    load_result,
    load_rows,
    merge_rows,
    plot_corruption_heatmap,
    plot_corruption_severity,
    plot_robustness_curve,
    shared_settings,
    write_report,
)

__all__ = [
    'amplified_perturbation',
    'colorize',
    'corruption_budget',
    'evaluation_budget',
    'format_corruption_details',
    'format_corruption_table',
    'format_flags',
    'format_overview_table',
    'format_table',
    'image_miou',
    'load_example',
    'load_result',
    'load_rows',
    'merge_rows',
    'plot_corruption_heatmap',
    'plot_corruption_severity',
    'plot_robustness_curve',
    'save_example',
    'save_picture_grid',
    'shared_settings',
    'write_report',
]
