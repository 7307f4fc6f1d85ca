"""Shared machinery of the checkpoint converters (docs/algorithms.md section 7).

Every converter maps *every* source tensor by an explicit rule or drops it by an
explicit rule; anything else is an error naming the tensor. The converted state
dict is then checked against the target model's own layout (names and shapes), so
a missing or wrongly shaped tensor fails too, before anything is written.
"""
import os
import os.path as osp
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from mmseg_robust.models.backbones.strict_pretrained import check_state_dict

__all__ = [
    'Rule', 'apply_rules', 'expected_layout', 'load_source_checkpoint',
    'save_checkpoint', 'strip_prefixes', 'unwrap_state_dict'
]

StateDict = Dict[str, torch.Tensor]
# (regex on the source name, replacement template or None to drop, optional
# tensor transform).
Rule = Tuple[str, Optional[str], Optional[Callable[[torch.Tensor], torch.Tensor]]]


def unwrap_state_dict(obj, source: str = 'checkpoint') -> StateDict:
    """The state dict inside a loaded checkpoint.

    Accepts a plain state dict (all values tensors) or a dict with a
    ``'state_dict'`` or ``'model'`` entry holding one (mmengine / timm / DeiT
    style files).
    """
    if isinstance(obj, dict) and obj and all(
            isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in ('state_dict', 'model'):
            if isinstance(obj.get(key), dict):
                return unwrap_state_dict(obj[key], source)
    raise TypeError(f'{source}: no state dict found (expected a dict of tensors, '
                    "or one under 'state_dict' or 'model'); top-level keys: "
                    f'{sorted(obj)[:10] if isinstance(obj, dict) else type(obj)}')


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
                    new = new[len(p):]
                    changed = True
        if new in out:
            raise KeyError(f'two source tensors map to {new!r} after removing the '
                           f'prefixes {list(prefixes)} (one of them is {name!r})')
        out[new] = tensor
    return out


def apply_rules(state_dict: StateDict, rules: Iterable[Rule],
                what: str = 'source checkpoint') -> Tuple[StateDict, List[str]]:
    """Rename every tensor by the first matching rule.

    Args:
        state_dict (dict): source name -> tensor.
        rules (list[Rule]): ``(pattern, replacement, transform)``; the pattern must
            match the whole name; ``replacement=None`` drops the tensor.
        what (str): what ``state_dict`` is, for messages.

    Returns:
        tuple: ``(converted state dict, names of the dropped source tensors)``.

    Raises:
        KeyError: a tensor no rule matches (all of them are named), or two
            tensors mapping to one name.
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
                    raise KeyError(f'{what}: two tensors map to {new!r} (one is '
                                   f'{name!r})')
                out[new] = fn(tensor) if fn is not None else tensor
            break
        else:
            unmapped.append(name)
    if unmapped:
        more = f' ... and {len(unmapped) - 20} more' if len(unmapped) > 20 else ''
        raise KeyError(f'{what}: {len(unmapped)} tensor(s) of an unknown layout, '
                       f'not converted: {", ".join(sorted(unmapped)[:20])}{more}')
    return out, sorted(dropped)


def expected_layout(model: torch.nn.Module) -> Dict[str, torch.Size]:
    """Name -> shape of every tensor in ``model``'s state dict."""
    return {k: v.shape for k, v in model.state_dict().items()}


def check_converted(state_dict: StateDict, expected: Dict[str, torch.Size],
                    what: str) -> None:
    """Missing, unexpected or wrongly shaped tensors raise, naming them."""
    check_state_dict(state_dict, expected, what=what)


def load_source_checkpoint(path: str, trust: bool = False) -> StateDict:
    """Load a source checkpoint on CPU and return its state dict.

    ``weights_only=True`` unless ``trust`` (only for files from a source you
    trust: unpickling can run code).
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'no such checkpoint: {path}')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=not trust)
    except Exception as e:  # noqa: BLE001 - re-raised with advice
        if trust:
            raise
        raise RuntimeError(
            f'{path} cannot be loaded with weights_only=True ({e}). If you trust '
            'the file, rerun with --trust-source.') from e
    return unwrap_state_dict(obj, path)


def save_checkpoint(path: str, state_dict: StateDict, meta: dict) -> None:
    """Write ``{'state_dict': ..., 'meta': meta}`` (loadable with
    ``torch.load(..., weights_only=True)``; ``meta`` holds str/int/list only)."""
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    torch.save({'state_dict': state, 'meta': meta}, path)


def convnext_arch_of(state: StateDict, blocks_prefix: str, dwconv_key: str,
                     source: str):
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
            int(k[len(prefix):].split('.')[0])
            for k in state if k.startswith(prefix)
        }
        if not blocks or blocks != set(range(len(blocks))):
            raise KeyError(f'stage {j}: blocks {sorted(blocks)} under {prefix}* '
                           f'(some missing or none): not a {source} checkpoint')
        depths.append(len(blocks))
        key = dwconv_key.format(j=j)
        if key not in state:
            raise KeyError(f'missing tensor {key}')
        channels.append(int(state[key].shape[0]))
    for name, arch in ConvNeXtCvSt.arch_settings.items():
        if arch['depths'] == depths and arch['channels'] == channels:
            return name
    return dict(depths=depths, channels=channels)
