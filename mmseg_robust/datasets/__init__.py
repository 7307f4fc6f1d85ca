from .ade20k151 import ADE20K151Dataset
from .corruptions import (
    BENCHMARK_CORRUPTIONS,
    CATEGORIES,
    CORRUPTIONS,
    Corrupt,
    corrupt_image,
    corruption_seed,
    resolve_corruptions,
    resolve_severities,
    with_corruption,
)
from .synthetic import (
    CLASSES,
    SyntheticShapesDataset,
    generate_synthetic_dataset,
    render_sample,
)
from .transforms import (
    RandomGaussianBlur,
    ScoreAtImageShape,
    ShortEdgeResizeCenterCrop,
)
from .voc_void_as_background import PascalVOCVoidAsBackgroundDataset

__all__ = [
    'ADE20K151Dataset',
    'BENCHMARK_CORRUPTIONS',
    'CATEGORIES',
    'CORRUPTIONS',
    'Corrupt',
    'corrupt_image',
    'corruption_seed',
    'resolve_corruptions',
    'resolve_severities',
    'with_corruption',
    'PascalVOCVoidAsBackgroundDataset',
    'RandomGaussianBlur',
    'ScoreAtImageShape',
    'ShortEdgeResizeCenterCrop',
    'CLASSES',
    'SyntheticShapesDataset',
    'generate_synthetic_dataset',
    'render_sample',
]
