"""ADE20K with 151 classes: label 0 ("other") kept as a class.

The label protocol of the SEA/PIR-AT papers' ADE20K models (docs/algorithms.md
section 5.1); mmseg's ``ADE20KDataset`` ignores label 0 and shifts the rest down
by one (150 classes). Used by ``configs/_base_/datasets/ade20k151_512x512.py``.
"""

from mmseg.datasets import ADE20KDataset

from mmseg_robust.registry import DATASETS

__all__ = ['ADE20K151Dataset']


@DATASETS.register_module()
class ADE20K151Dataset(ADE20KDataset):
    """ADE20K with 151 classes: label 0 ("other") is a class, not ignored.

    mmseg's ``ADE20KDataset`` sets ``reduce_zero_label=True`` (150 classes, 0
    ignored, labels shifted by -1); the SEA/PIR-AT models predict 151 classes on
    the raw labels. Same files and arguments, ``reduce_zero_label`` must stay
    False. Predictions and labels use the raw ADE20K indices (0..150).
    """

    METAINFO = dict(
        classes=('other',) + tuple(ADE20KDataset.METAINFO['classes']),
        palette=[[0, 0, 0]] + list(ADE20KDataset.METAINFO['palette']),
    )

    def __init__(self, reduce_zero_label: bool = False, **kwargs) -> None:
        if reduce_zero_label:
            raise ValueError(
                'ADE20K151Dataset keeps label 0 as a class: '
                "reduce_zero_label must be False (use mmseg's "
                'ADE20KDataset for the 150-class protocol)'
            )
        super().__init__(reduce_zero_label=False, **kwargs)
