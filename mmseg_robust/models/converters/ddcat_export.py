"""Deploy a DDC-AT model as the plain segmentor it was built on (docs/algorithms.md
section 5.3: "deployment drops cls2 and mask1").

A DDC-AT head keeps its inference branch cls1 in the plain head's own modules
(``bottleneck`` + ``conv_seg``; ``fpn_bottleneck`` + ``conv_seg`` for UPerNet), so
the plain model is the DDC-AT state dict minus the extra branches, loaded into the
plain head type:

=================  ============================================================
DDC-AT head        plain head
=================  ============================================================
``DDCATPSPHead``   mmseg's ``PSPHead``
``DDCATASPPHead``  :class:`~mmseg_robust.models.decode_heads.DeepLabV3Head`
                   (mmseg's ``ASPPHead`` when ``bottleneck_kernel_size=3``)
``DDCATUPerHead``  mmseg's ``UPerHead``
=================  ============================================================

``tools/model_converters/export_ddcat.py CONFIG CKPT OUT`` applies these functions
to files.
"""

import copy
from collections import OrderedDict
from typing import Mapping

from torch import Tensor

from mmseg_robust.models.checkpoint import CheckpointError
from mmseg_robust.models.decode_heads.ddcat_heads import DDCAT_EXTRA_BRANCHES

__all__ = ['export_plain_state_dict', 'plain_head_cfg', 'plain_model_cfg']

_PLAIN_HEADS = {
    'DDCATPSPHead': 'PSPHead',
    'DDCATASPPHead': 'DeepLabV3Head',
    'DDCATUPerHead': 'UPerHead',
}


def plain_head_cfg(head_cfg: Mapping) -> dict:
    """Config of the plain head a DDC-AT head deploys as.

    Args:
        head_cfg (dict): a ``DDCATPSPHead``, ``DDCATASPPHead`` or
            ``DDCATUPerHead`` config.

    Returns:
        dict: the same config with the plain type and without the DDC-AT-only
        arguments.
    """
    cfg = copy.deepcopy(dict(head_cfg))
    head_type = str(cfg.get('type', ''))
    scope, _, name = head_type.rpartition('.')
    if name not in _PLAIN_HEADS:
        raise ValueError(
            f'not a DDC-AT decode head: {head_type!r} (expected one of '
            f'{sorted(_PLAIN_HEADS)})'
        )
    cfg.pop('loss_mask_weight', None)
    plain = _PLAIN_HEADS[name]
    if plain == 'DeepLabV3Head' and cfg.get('bottleneck_kernel_size', 1) == 3:
        plain = 'ASPPHead'
        cfg.pop('bottleneck_kernel_size')
    if plain == 'DeepLabV3Head':
        cfg.setdefault('bottleneck_kernel_size', 1)
    cfg['type'] = f'{scope}.{plain}' if scope else plain
    return cfg


def plain_model_cfg(model_cfg: Mapping) -> dict:
    """The segmentor config with its DDC-AT decode head replaced by the plain
    head (:func:`plain_head_cfg`); everything else unchanged."""
    cfg = copy.deepcopy(model_cfg)
    if 'decode_head' not in cfg:
        raise ValueError('the model config has no decode_head')
    cfg['decode_head'] = type(cfg['decode_head'])(plain_head_cfg(cfg['decode_head']))
    return cfg


def export_plain_state_dict(
    state_dict: Mapping[str, Tensor], head_prefix: str = 'decode_head.'
) -> 'OrderedDict[str, Tensor]':
    """Drop the training-only DDC-AT branches (``cls2*``, ``mask1*``) from a
    segmentor state dict; cls1 already lives in the plain head's modules
    (``bottleneck``/``conv_seg``, UPerNet ``fpn_bottleneck``/``conv_seg``).

    Args:
        state_dict: state dict of a segmentor with a DDC-AT decode head (mmengine
            checkpoint's ``state_dict``; a ``module.`` prefix is kept as is).
        head_prefix (str): name of the decode head in the state dict.
            Default: ``'decode_head.'``.

    Returns:
        OrderedDict: the plain segmentor's state dict (same tensors, no copies).

    Raises:
        CheckpointError: if no DDC-AT branch is found (not a DDC-AT
            checkpoint).
    """
    branch_prefixes = tuple(f'{head_prefix}{b}.' for b in DDCAT_EXTRA_BRANCHES)
    out, dropped = OrderedDict(), []
    for k, v in state_dict.items():
        name = k[len('module.') :] if k.startswith('module.') else k
        if name.startswith(branch_prefixes):
            dropped.append(k)
        else:
            out[k] = v
    if not dropped:
        raise CheckpointError(
            'no DDC-AT branch (cls2*, mask1*) under '
            f'{head_prefix!r} in the state dict: not a DDC-AT checkpoint'
        )
    return out
