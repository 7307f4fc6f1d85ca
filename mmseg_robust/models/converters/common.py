"""Shared machinery of the checkpoint converters (docs/algorithms.md section 8).

Every converter maps *every* source tensor by an explicit rule or drops it by an
explicit rule; anything else is an error naming the tensor. The converted state
dict is then checked against the target model's own layout (names and shapes:
:func:`~mmseg_robust.models.checkpoint.expected_shapes` and
:func:`~mmseg_robust.models.checkpoint.check_state_dict`), so a missing or wrongly
shaped tensor fails too, before anything is written. Reading and writing the files
is :mod:`mmseg_robust.models.checkpoint`'s.
"""

import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from mmseg_robust.models.checkpoint import CheckpointError

__all__ = ['Rule', 'apply_rules', 'convnext_arch_of', 'strip_prefixes']

StateDict = Dict[str, torch.Tensor]
# (regex on the source name, replacement template or None to drop, optional
# tensor transform).
Rule = Tuple[str, Optional[str], Optional[Callable[[torch.Tensor], torch.Tensor]]]


def strip_prefixes(state_dict: StateDict, prefixes: Sequence[str]) -> StateDict:
    """Remove any leading run of ``prefixes`` from every name (e.g. ``module.``
    of DDP, ``base_model.``/``model.`` of wrappers), repeatedly."""
    out = {}
    for name, tensor in state_dict.items():
        new = name
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if new.startswith(p):
                    new = new[len(p) :]
                    changed = True
        if new in out:
            raise CheckpointError(
                f'two source tensors map to {new!r} after removing the '
                f'prefixes {list(prefixes)} (one of them is {name!r})'
            )
        out[new] = tensor
    return out


def apply_rules(
    state_dict: StateDict, rules: Iterable[Rule], what: str = 'source checkpoint'
) -> Tuple[StateDict, List[str]]:
    """Rename every tensor by the first matching rule.

    Args:
        state_dict (dict): source name -> tensor.
        rules (list[Rule]): ``(pattern, replacement, transform)``; the pattern must
            match the whole name; ``replacement=None`` drops the tensor.
        what (str): what ``state_dict`` is, for messages.

    Returns:
        tuple: ``(converted state dict, names of the dropped source tensors)``.

    Raises:
        CheckpointError: a tensor no rule matches (all of them are named), or
            two tensors mapping to one name.
    """
    compiled = [(re.compile(p), r, f) for p, r, f in rules]
    out, dropped, unmapped = {}, [], []
    for name, tensor in state_dict.items():
        for pattern, repl, fn in compiled:
            m = pattern.fullmatch(name)
            if m is None:
                continue
            if repl is None:
                dropped.append(name)
            else:
                new = m.expand(repl)
                if new in out:
                    raise CheckpointError(
                        f'{what}: two tensors map to {new!r} (one is {name!r})'
                    )
                out[new] = fn(tensor) if fn is not None else tensor
            break
        else:
            unmapped.append(name)
    if unmapped:
        more = f' ... and {len(unmapped) - 20} more' if len(unmapped) > 20 else ''
        raise CheckpointError(
            f'{what}: {len(unmapped)} tensor(s) of an unknown layout, not '
            f'converted: {", ".join(sorted(unmapped)[:20])}{more}'
        )
    return out, sorted(dropped)


def convnext_arch_of(
    state: StateDict, blocks_prefix: str, dwconv_key: str, source: str
):
    """The ConvNeXt ``arch`` of a checkpoint, from its blocks per stage and the
    width of each stage's first depth-wise convolution.

    Args:
        state (dict): the source state dict.
        blocks_prefix (str): key prefix of stage ``{j}``'s blocks, the block index
            following it (e.g. ``'stages.{j}.blocks.'``).
        dwconv_key (str): key of stage ``{j}``'s first depth-wise conv weight.
        source (str): the checkpoint kind, for error messages.

    Returns:
        str | dict: the name in ``ConvNeXtCvSt.arch_settings`` or
        ``dict(depths=..., channels=...)``.
    """
    from mmseg_robust.models.backbones import ConvNeXtCvSt

    depths, channels = [], []
    for j in range(4):
        prefix = blocks_prefix.format(j=j)
        blocks = {
            int(k[len(prefix) :].split('.')[0]) for k in state if k.startswith(prefix)
        }
        if not blocks or blocks != set(range(len(blocks))):
            raise CheckpointError(
                f'stage {j}: blocks {sorted(blocks)} under {prefix}* '
                f'(some missing or none): not a {source} checkpoint'
            )
        depths.append(len(blocks))
        key = dwconv_key.format(j=j)
        if key not in state:
            raise CheckpointError(f'missing tensor {key}')
        channels.append(int(state[key].shape[0]))
    for name, arch in ConvNeXtCvSt.arch_settings.items():
        if arch['depths'] == depths and arch['channels'] == channels:
            return name
    return dict(depths=depths, channels=channels)
