"""Strict ``Pretrained`` initialisation for backbones.

mmengine's ``PretrainedInit`` (and mmseg's ``VisionTransformer.init_weights``) load
checkpoints with ``strict=False``: a file with other key names, or one made for
another architecture, loads *nothing* and only logs a warning, and the model then
trains from a random backbone. The robust backbones of PIR-AT (docs/algorithms.md
section 5.1) are the point of the method, so our backbones refuse such files; for
any other module (e.g. mmseg's ResNet of the SAT/DDC-AT configs, sections 5.2 and
5.3) the weight initializer ``init_cfg=dict(type='PretrainedStrict', ...)``
(:class:`PretrainedStrictInit`) does the same.
"""

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import update_init_info
from mmengine.runner.checkpoint import CheckpointLoader

from mmseg_robust.models.checkpoint import (
    CheckpointError,
    check_state_dict,
    expected_shapes,
    load_checkpoint_file,
    unwrap_state_dict,
)
from mmseg_robust.registry import WEIGHT_INITIALIZERS

__all__ = ['PretrainedStrictInit', 'load_pretrained_strict', 'split_pretrained_cfg']

StateDict = Dict[str, torch.Tensor]


def split_pretrained_cfg(init_cfg) -> Tuple[Optional[dict], list]:
    """Split an ``init_cfg`` into its ``Pretrained`` entry and the others.

    Returns:
        tuple: ``(pretrained_cfg or None, [other init cfgs])``.
    """
    if init_cfg is None:
        return None, []
    cfgs = list(init_cfg) if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    pretrained = [c for c in cfgs if c.get('type') == 'Pretrained']
    others = [c for c in cfgs if c.get('type') != 'Pretrained']
    if len(pretrained) > 1:
        raise ValueError(f'init_cfg has more than one Pretrained entry: {init_cfg}')
    return (pretrained[0] if pretrained else None), others


def load_pretrained_strict(
    module: torch.nn.Module,
    checkpoint: Union[str, StateDict],
    prefix: Optional[str] = None,
    revise: Optional[Callable[[StateDict], StateDict]] = None,
    hint: str = '',
) -> List[str]:
    """Load a backbone checkpoint into ``module`` strictly.

    Args:
        module (nn.Module): the backbone.
        checkpoint (str | dict): a file (loaded on the CPU with
            ``weights_only=True``), a URL (mmengine's ``CheckpointLoader``), or
            an already loaded checkpoint; its state dict is found by
            :func:`~mmseg_robust.models.checkpoint.unwrap_state_dict`
            (``'state_dict'``/``'model'`` entries, ``module.`` prefix).
        prefix (str, optional): keep only the tensors under this prefix, with
            the prefix removed (e.g. ``'backbone.'`` to take the backbone of a
            full segmentor checkpoint), as mmengine's ``PretrainedInit``.
        revise (callable, optional): ``state_dict -> state_dict`` applied before
            the check (e.g. resizing position embeddings).
        hint (str): how to fix a mismatch, appended to the error message.

    Returns:
        list[str]: the loaded tensor names.

    Raises:
        CheckpointError (a ``KeyError`` and ``ValueError``): any missing,
            unexpected or wrongly shaped tensor, named in the message
            (:func:`~mmseg_robust.models.checkpoint.check_state_dict`). Nothing
            is loaded then.
    """
    source = checkpoint if isinstance(checkpoint, str) else '<state dict>'
    if isinstance(checkpoint, str):
        if '://' in checkpoint:  # a URL or an mmengine scheme (open-mmlab://)
            checkpoint = CheckpointLoader.load_checkpoint(
                checkpoint, map_location='cpu'
            )
        else:
            checkpoint = load_checkpoint_file(checkpoint)
    state = unwrap_state_dict(checkpoint, source)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f'{source} has no tensor under the prefix {prefix!r}')
    if revise is not None:
        state = revise(state)
    check_state_dict(
        state,
        expected_shapes(module),
        what=f'{source} ({type(module).__name__})',
        hint=hint,
    )
    module.load_state_dict(state, strict=True)
    print_log(
        f'{type(module).__name__}: loaded all {len(state)} tensors of {source} '
        '(strict)',
        logger='current',
    )
    return sorted(state)


@WEIGHT_INITIALIZERS.register_module(name='PretrainedStrict')
class PretrainedStrictInit:
    """Weight initializer ``dict(type='PretrainedStrict', checkpoint=...,
    prefix=None)``: mmengine's ``Pretrained`` loaded strictly.

    Every tensor of the module (parameters and buffers) must come from the file,
    with the right shape, and the file must hold nothing else
    (:func:`load_pretrained_strict`): a wrong file raises, naming the tensors,
    instead of leaving a random module after a warning.

    mmengine runs initializers other than ``Pretrained`` before the children's
    own ``init_weights``; as every tensor under the module comes from the file,
    its sub-modules are marked initialised so that none of them re-initialises
    itself afterwards.

    Args:
        checkpoint (str): path or URL of the checkpoint (loaded on CPU, as in
            :func:`load_pretrained_strict`).
        prefix (str, optional): load the tensors under this prefix only, with
            the prefix removed (e.g. ``'backbone.'`` of a full segmentor
            checkpoint). Default: None (the whole file).

    Example:
        >>> backbone = dict(type='ResNetV1c', depth=50, init_cfg=dict(
        ...     type='PretrainedStrict', checkpoint='resnet50_backbone.pth'))
    """

    def __init__(self, checkpoint: str, prefix: Optional[str] = None) -> None:
        if not isinstance(checkpoint, str) or not checkpoint:
            raise TypeError(
                f'PretrainedStrict needs checkpoint=<path or URL>, got {checkpoint!r}'
            )
        self.checkpoint = checkpoint
        self.prefix = prefix
        self.wholemodule = False  # set by mmengine's initialize; unused here

    def __call__(self, module: torch.nn.Module) -> None:
        load_pretrained_strict(
            module,
            self.checkpoint,
            prefix=self.prefix,
            hint='PretrainedStrict needs a file made for this module (convert '
            'it with the matching tool in tools/model_converters/)',
        )
        for sub in module.modules():
            if sub is not module and isinstance(sub, BaseModule):
                sub._is_init = True
        if hasattr(module, '_params_init_info'):
            update_init_info(module, init_info=self._get_init_info())

    def _get_init_info(self) -> str:
        return f'{type(self).__name__}: load from {self.checkpoint} (strict)'
