from . import (
    backbones,  # noqa: F401  (registers ConvNeXtCvSt, ViT)
    decode_heads,  # noqa: F401  (registers the DDC-AT heads)
    segmentors,  # noqa: F401  (registers SlideSoftmaxEncoderDecoder)
)
from .cheaper_passes import SPEEDUPS, CheaperPasses, check_bf16, resolve_speedups
from .pixel_space import (
    PixelNormalizer,
    SegmentorPixelView,
    TrainingBatchPixelView,
    ignore_index_of,
    unwrap_model,
)

__all__ = [
    'SPEEDUPS',
    'CheaperPasses',
    'check_bf16',
    'resolve_speedups',
    'PixelNormalizer',
    'SegmentorPixelView',
    'TrainingBatchPixelView',
    'ignore_index_of',
    'unwrap_model',
]
