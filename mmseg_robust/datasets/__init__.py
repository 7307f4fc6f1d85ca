from .pirat_protocols import (ADE20K151Dataset,
                              PascalVOCVoidAsBackgroundDataset,
                              RandomGaussianBlur, ShortEdgeResizeCenterCrop)
from .synthetic import (CLASSES, SyntheticShapesDataset,
                        generate_synthetic_dataset, render_sample)

__all__ = [
    'ADE20K151Dataset', 'PascalVOCVoidAsBackgroundDataset',
    'RandomGaussianBlur', 'ShortEdgeResizeCenterCrop',
    'CLASSES', 'SyntheticShapesDataset', 'generate_synthetic_dataset',
    'render_sample'
]
