"""Strict ``Pretrained`` initialisation for backbones.

mmengine's ``PretrainedInit`` (and mmseg's ``VisionTransformer.init_weights``) load
checkpoints with ``strict=False``: a file with other key names, or one made for
another architecture, loads *nothing* and only logs a warning, and the model then
trains from a random backbone. The robust backbones of PIR-AT (ALGORITHMS.md
section 5.1) are the point of the method, so our backbones refuse such files.
"""
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = ['load_pretrained_strict', 'split_pretrained_cfg', 'check_state_dict']

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


def _names(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def check_state_dict(state_dict: StateDict,
                     expected: Dict[str, torch.Size],
                     what: str = 'checkpoint',
                     hint: str = '') -> None:
    """Raise ``KeyError``/``ValueError`` naming every tensor that does not fit.

    Args:
        state_dict (dict): name -> tensor to check.
        expected (dict): name -> shape of the target module.
        what (str): what ``state_dict`` is, for the message.
        hint (str): appended to the message (how to fix it).
    """
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f'missing tensors ({len(missing)}): {_names(missing)}')
        if unexpected:
            parts.append(
                f'unexpected tensors ({len(unexpected)}): {_names(unexpected)}')
        raise KeyError(f'{what} does not fit the model: ' + '; '.join(parts) +
                       (f'. {hint}' if hint else ''))
    wrong = [
        f'{k}: {tuple(state_dict[k].shape)} (model: {tuple(expected[k])})'
        for k in sorted(expected)
        if tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    if wrong:
        raise ValueError(f'{what} has tensors of the wrong shape: ' +
                         '; '.join(wrong[:12]) +
                         (f' ... and {len(wrong) - 12} more' if len(wrong) > 12
                          else '') + (f'. {hint}' if hint else ''))


def load_pretrained_strict(
        module: torch.nn.Module,
        checkpoint: Union[str, StateDict],
        prefix: Optional[str] = None,
        revise: Optional[Callable[[StateDict], StateDict]] = None,
        hint: str = '') -> List[str]:
    """Load a backbone checkpoint into ``module`` strictly.

    Args:
        module (nn.Module): the backbone.
        checkpoint (str | dict): path or URL (mmengine's ``CheckpointLoader``,
            loaded on CPU), or an already loaded checkpoint. A dict with a
            ``'state_dict'`` entry (mmengine/mmseg files) is unwrapped.
        prefix (str, optional): keep only the tensors under this prefix, with
            the prefix removed (e.g. ``'backbone.'`` to take the backbone of a
            full segmentor checkpoint), as mmengine's ``PretrainedInit``.
        revise (callable, optional): ``state_dict -> state_dict`` applied before
            the check (e.g. resizing position embeddings).
        hint (str): how to fix a mismatch, appended to the error message.

    Returns:
        list[str]: the loaded tensor names.

    Raises:
        KeyError / ValueError: any missing, unexpected or wrongly shaped tensor,
            named in the message. Nothing is loaded then.
    """
    source = checkpoint if isinstance(checkpoint, str) else '<state dict>'
    if isinstance(checkpoint, str):
        checkpoint = CheckpointLoader.load_checkpoint(
            checkpoint, map_location='cpu')
    state = checkpoint
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if not isinstance(state, dict):
        raise TypeError(f'{source}: expected a state dict, got {type(state)}')
    if prefix:
        state = {
            k[len(prefix):]: v
            for k, v in state.items() if k.startswith(prefix)
        }
        if not state:
            raise KeyError(f'{source} has no tensor under the prefix {prefix!r}')
    state = dict(state)
    if revise is not None:
        state = revise(state)
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(
        state, expected, what=f'{source} ({type(module).__name__})', hint=hint)
    module.load_state_dict(state, strict=True)
    print_log(
        f'{type(module).__name__}: loaded all {len(state)} tensors of {source} '
        '(strict)',
        logger='current')
    return sorted(state)
