"""Convert the DDC-AT / SAT checkpoints of
``dvlab-research/Robust-Semantic-Segmentation`` (semseg naming) to mmseg state
dicts (docs/algorithms.md section 8).

Source layout (``hszhao/semseg`` PSPNet / DeepLabv3 on a deep-stem ResNet-50, saved
from a DataParallel/DDP model, so every key starts with ``module.``)::

    layer0.{0,1,3,4,6,7}        deep stem: conv1 3->64 s2, bn1, conv2 64->64, bn2,
                                conv3 64->128, bn3 (Sequential indices)
    layer1..layer4.*            torchvision Bottleneck blocks (conv2 strided/dilated)
    ppm.features.i.{1,2}        PSP: pool -> 1x1 conv (2048->512) -> BN, bins 1,2,3,6
    aspp.convs.{0..3}.{0,1}     DeepLabv3: 1x1 and 3x3 atrous (6,12,18) conv -> BN
    aspp.convs.4.{1,2}          DeepLabv3: image pooling -> 1x1 conv -> BN
    cls.{0,1,4}                 SAT / no defense: bottleneck conv, BN, 1x1 classifier
    cls1/cls2/mask1.{0,1,4}     DDC-AT: the same, three times (mask1 has 2 outputs)
    aux.{0,1,4} | aux_cls1.*    auxiliary head on layer3 (``aux_cls1`` in DDC-AT)

Target layout: mmseg's ``EncoderDecoder`` with ``ResNetV1c(stem_channels=128,
dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), contract_dilation=False)``, ``PSPHead``
or :class:`~mmseg_robust.models.decode_heads.DeepLabV3Head` (1x1 bottleneck), the
DDC-AT heads of :mod:`mmseg_robust.models.decode_heads` for DDC-AT files, and an
``FCNHead`` auxiliary head (see ``configs/_base_/models/*_r50-stem128-d8.py``).

The reference concatenates the ASPP branches as ``[1x1, atrous..., pooling]``, mmseg
as ``[pooling, 1x1, atrous...]``: the input channels of every bottleneck that reads
the ASPP features are permuted accordingly. Every source tensor must be mapped and
every target tensor filled with the right shape; otherwise
:class:`~mmseg_robust.models.checkpoint.CheckpointError` names the tensors (a
checkpoint loaded with ``strict=False`` into the wrong head would silently keep a
random classifier).

The backbone-only ImageNet initialisation of the reference (semseg's
``resnet50_v2.pth``: ``conv1, bn1, conv2, bn2, conv3, bn3, layer1..4, fc``) converts
too (``fc`` dropped), to a backbone-relative state dict for ``init_cfg``.
"""

import re
from collections import OrderedDict
from typing import Iterable, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from mmseg_robust.models.checkpoint import (
    CheckpointError,
    check_state_dict,
    unwrap_state_dict,
)

__all__ = ['SemsegLayout', 'convert_semseg_state_dict', 'detect_semseg_layout']

_BN = r'(?:weight|bias|running_mean|running_var|num_batches_tracked)'
_BLOCK = (
    r'\d+\.(?:conv[123]\.weight|bn[123]\.'
    + _BN
    + r'|downsample\.0\.weight|downsample\.1\.'
    + _BN
    + r')'
)
# deep stem: the Sequential indices of semseg's layer0 equal those of mmseg's stem
_STEM_INDEX = {
    'conv1': '0',
    'bn1': '1',
    'conv2': '3',
    'bn2': '4',
    'conv3': '6',
    'bn3': '7',
}
# the DDC-AT / SAT classifier branches: (bottleneck, classifier) in mmseg
_BRANCHES = {
    'cls': ('decode_head.bottleneck', 'decode_head.conv_seg'),
    'cls1': ('decode_head.bottleneck', 'decode_head.conv_seg'),
    'cls2': ('decode_head.cls2_bottleneck', 'decode_head.cls2'),
    'mask1': ('decode_head.mask1_bottleneck', 'decode_head.mask1'),
    'aux': ('auxiliary_head.convs.0', 'auxiliary_head.conv_seg'),
    'aux_cls1': ('auxiliary_head.convs.0', 'auxiliary_head.conv_seg'),
}


class SemsegLayout(NamedTuple):
    """What a semseg-style checkpoint holds.

    Attributes:
        arch (str): ``'pspnet'``, ``'deeplabv3'`` or ``'resnet'`` (backbone only,
            the ImageNet initialisation).
        scheme (str): ``'plain'`` (one classifier ``cls``: SAT or no defense),
            ``'ddcat'`` (``cls1``, ``cls2``, ``mask1``) or ``'backbone'``.
        num_classes (int): classes of the main classifier (1000 for ``resnet``).
        has_aux (bool): whether the auxiliary head is in the file.
    """

    arch: str
    scheme: str
    num_classes: int
    has_aux: bool


def detect_semseg_layout(state_dict: Mapping[str, Tensor]) -> SemsegLayout:
    """Recognise a reference checkpoint (its state dict, without the ``module.``
    prefix: :func:`~mmseg_robust.models.checkpoint.unwrap_state_dict`)."""
    keys = list(state_dict)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has('conv1.') and has('layer1.') and not has('layer0.'):
        fc = state_dict.get('fc.weight')
        return SemsegLayout(
            'resnet', 'backbone', fc.shape[0] if fc is not None else 0, False
        )
    if not has('layer0.'):
        raise CheckpointError(
            'not a semseg/DDC-AT checkpoint: no layer0.* (deep-stem ResNet) keys; '
            f'first keys: {keys[:5]}'
        )
    if has('ppm.') == has('aspp.'):
        raise CheckpointError(
            'cannot tell PSPNet from DeepLabv3: expected exactly one of ppm.* '
            'and aspp.* in the checkpoint'
        )
    arch = 'pspnet' if has('ppm.') else 'deeplabv3'
    if has('cls1.'):
        scheme, head = 'ddcat', 'cls1'
    elif has('cls.'):
        scheme, head = 'plain', 'cls'
    else:
        raise CheckpointError(
            'no classifier found: expected cls.* (SAT / no defense) or cls1.*, '
            'cls2.*, mask1.* (DDC-AT)'
        )
    weight = state_dict.get(f'{head}.4.weight')
    if weight is None:
        raise CheckpointError(f'{head}.4.weight (classifier) is missing')
    return SemsegLayout(
        arch, scheme, int(weight.shape[0]), has('aux.') or has('aux_cls1.')
    )


def _target_key(key: str, arch: str) -> Optional[str]:
    """mmseg name of one semseg tensor, None if the key has no mapping."""
    # ImageNet backbone (backbone-relative names)
    if arch == 'resnet':
        m = re.fullmatch(r'(conv[123]|bn[123])\.(' + _BN + '|weight)', key)
        if m:
            return f'stem.{_STEM_INDEX[m.group(1)]}.{m.group(2)}'
        if re.fullmatch(r'layer[1-4]\.' + _BLOCK, key):
            return key
        return None
    m = re.fullmatch(r'layer0\.(\d+|conv[123]|bn[123])\.(' + _BN + ')', key)
    if m:
        idx = _STEM_INDEX.get(m.group(1), m.group(1))
        if idx in _STEM_INDEX.values():
            return f'backbone.stem.{idx}.{m.group(2)}'
        return None
    if re.fullmatch(r'layer[1-4]\.' + _BLOCK, key):
        return 'backbone.' + key
    if arch == 'pspnet':
        m = re.fullmatch(r'ppm\.features\.(\d+)\.([12])\.(' + _BN + ')', key)
        if m:
            i, j, p = m.groups()
            if j == '1' and p != 'weight':
                return None
            return f'decode_head.psp_modules.{i}.1.{"conv" if j == "1" else "bn"}.{p}'
    if arch == 'deeplabv3':
        # aspp.convs.{0..n-2}.{0 conv, 1 bn}; the last one is image pooling,
        # {1 conv, 2 bn} after the AdaptiveAvgPool2d. Which index is the pooling
        # branch is settled in convert_semseg_state_dict (it knows n).
        m = re.fullmatch(r'aspp\.convs\.(\d+)\.([012])\.(' + _BN + ')', key)
        if m:
            return key  # placeholder, resolved by _aspp_target
    m = re.fullmatch(r'(cls|cls1|cls2|mask1|aux|aux_cls1)\.([014])\.(' + _BN + ')', key)
    if m:
        branch, idx, p = m.groups()
        bottleneck, classifier = _BRANCHES[branch]
        if idx == '0' and p == 'weight':
            return f'{bottleneck}.conv.weight'
        if idx == '1':
            return f'{bottleneck}.bn.{p}'
        if idx == '4' and p in ('weight', 'bias'):
            return f'{classifier}.{p}'
    return None


def _aspp_target(key: str, pool_index: int) -> Optional[str]:
    i, j, p = re.fullmatch(r'aspp\.convs\.(\d+)\.([012])\.(\w+)', key).groups()
    i = int(i)
    if i == pool_index:
        if j == '1' and p == 'weight':
            return 'decode_head.image_pool.1.conv.weight'
        if j == '2':
            return f'decode_head.image_pool.1.bn.{p}'
        return None
    if i < pool_index:
        if j == '0' and p == 'weight':
            return f'decode_head.aspp_modules.{i}.conv.weight'
        if j == '1':
            return f'decode_head.aspp_modules.{i}.bn.{p}'
    return None


def _aspp_to_mmseg_order(weight: Tensor, n_branches: int, name: str) -> Tensor:
    """Permute the input channels of a bottleneck reading the ASPP concatenation:
    reference ``[b_0, ..., b_{n-2}, pool]`` -> mmseg ``[pool, b_0, ..., b_{n-2}]``."""
    c = weight.shape[1]
    if c % n_branches:
        raise CheckpointError(
            f'{name}: {c} input channels do not split into {n_branches} ASPP branches'
        )
    per = c // n_branches
    return torch.cat([weight[:, c - per :], weight[:, : c - per]], dim=1).contiguous()


def convert_semseg_state_dict(
    state_dict: Mapping[str, Tensor],
    expected: Optional[Mapping[str, Tuple[int, ...]]] = None,
    drop: Iterable[str] = (),
) -> 'OrderedDict[str, Tensor]':
    """Convert a reference (semseg-naming) state dict to mmseg names.

    Args:
        state_dict: a reference checkpoint (``{'state_dict': ...}`` or the state
            dict itself, with or without the ``module.`` prefix).
        expected: target names and shapes
            (:func:`~mmseg_robust.models.checkpoint.expected_shapes` of the
            target model config). If given, the result must fill it exactly
            (:func:`~mmseg_robust.models.checkpoint.check_state_dict`; missing
            ``num_batches_tracked`` counters of an old torch's BatchNorm are
            added as 0).
        drop: source key prefixes to leave out on purpose (e.g. ``('cls2.',
            'mask1.')`` to convert a DDC-AT file straight to the plain model).
            ``fc.`` of the ImageNet backbone is always dropped.

    Returns:
        OrderedDict: mmseg state dict (for ``arch='resnet'``: backbone-relative
        names, ``stem.*``, ``layer*.*``).

    Raises:
        CheckpointError: naming every unmapped source tensor, and (with
            ``expected``) every missing, unexpected or wrong-shape target tensor.
    """
    sd = unwrap_state_dict(state_dict, 'DDC-AT/SAT reference checkpoint')
    layout = detect_semseg_layout(sd)
    drop = tuple(drop) + (('fc.',) if layout.arch == 'resnet' else ())
    pool_index = None
    if layout.arch == 'deeplabv3':
        pool_index = max(
            int(k.split('.')[2]) for k in sd if k.startswith('aspp.convs.')
        )
    out, sources, unmapped = OrderedDict(), {}, []
    for key, value in sd.items():
        if key.startswith(drop):
            continue
        target = _target_key(key, layout.arch)
        if target is not None and target.startswith('aspp.'):
            target = _aspp_target(key, pool_index)
        if target is None:
            unmapped.append(key)
            continue
        if target in out:
            raise CheckpointError(f'{key} and {sources[target]} both map to {target}')
        if pool_index is not None and target.startswith(
            (
                'decode_head.bottleneck.conv.',
                'decode_head.cls2_bottleneck.conv.',
                'decode_head.mask1_bottleneck.conv.',
            )
        ):
            value = _aspp_to_mmseg_order(value, pool_index + 1, key)
        out[target] = value
        sources[target] = key
    if unmapped:
        raise CheckpointError(
            f'{len(unmapped)} tensor(s) of the {layout.arch}/{layout.scheme} '
            'checkpoint have no mmseg counterpart: ' + ', '.join(unmapped)
        )
    if expected is not None:
        check_state_dict(
            out,
            expected,
            what=f'the converted {layout.arch}/{layout.scheme} checkpoint',
            source_names=sources,
            fill_num_batches_tracked=True,
        )
    return out
