"""Decode heads: DDC-AT heads and the 1x1-bottleneck DeepLabv3 head."""

from .ddcat_heads import (
    DDCAT_EXTRA_BRANCHES,
    DDCATASPPHead,
    DDCATHeadMixin,
    DDCATPSPHead,
    division_labels,
    route_logits,
)
from .ddcat_uper_head import DDCATUPerHead
from .deeplabv3_head import DeepLabV3Head

__all__ = [
    'DDCATASPPHead',
    'DDCATHeadMixin',
    'DDCATPSPHead',
    'DDCATUPerHead',
    'DDCAT_EXTRA_BRANCHES',
    'DeepLabV3Head',
    'division_labels',
    'route_logits',
]
