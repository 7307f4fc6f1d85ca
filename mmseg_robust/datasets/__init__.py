from .synthetic import (CLASSES, SyntheticShapesDataset,
                        generate_synthetic_dataset, render_sample)

__all__ = [
    'CLASSES', 'SyntheticShapesDataset', 'generate_synthetic_dataset',
    'render_sample'
]
