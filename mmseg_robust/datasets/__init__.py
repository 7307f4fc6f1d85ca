from .ade20k151 import ADE20K151Dataset
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
    'PascalVOCVoidAsBackgroundDataset',
    'RandomGaussianBlur',
    'ScoreAtImageShape',
    'ShortEdgeResizeCenterCrop',
    'CLASSES',
    'SyntheticShapesDataset',
    'generate_synthetic_dataset',
    'render_sample',
]
