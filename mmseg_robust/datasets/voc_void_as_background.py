"""PASCAL-VOC with the void label mapped to background (21 classes, nothing
ignored in the annotations).

The label protocol of the SEA/PIR-AT papers' PASCAL-VOC models (docs/algorithms.md
section 5.1): the reference converts the colour annotations to indices and void's
colour matches no class, so void pixels become background (0). Used by
``configs/_base_/datasets/voc12aug_void-as-background_473x473.py``.
"""

from typing import Optional, Sequence

from mmseg.datasets import PascalVOCDataset

from mmseg_robust.registry import DATASETS

__all__ = ['PascalVOCVoidAsBackgroundDataset']


@DATASETS.register_module()
class PascalVOCVoidAsBackgroundDataset(PascalVOCDataset):
    """PASCAL-VOC with the void label (255) mapped to background (0).

    mmseg's ``PascalVOCDataset`` with a fixed ``label_map={255: 0}``, applied by
    ``LoadAnnotations`` to every annotation (train and val, ``SegmentationClass``
    and ``SegmentationClassAug``). Every pixel then carries one of the 21 labels;
    only padding added by the data preprocessor is ignored.
    Arguments as ``PascalVOCDataset`` (custom class subsets are not supported).
    """

    @classmethod
    def get_label_map(cls, new_classes: Optional[Sequence] = None) -> dict:
        if super().get_label_map(new_classes) is not None:
            raise ValueError(
                'PascalVOCVoidAsBackgroundDataset uses the 21 VOC '
                'classes; a class subset is not supported'
            )
        return {255: 0}
