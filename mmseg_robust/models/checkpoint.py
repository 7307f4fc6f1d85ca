"""The one home of checkpoint files: reading them, finding their state dict,
knowing what a model expects, and checking the one against the other.

Everything that reads a checkpoint uses these functions: the strict pretrained
initialisation (:mod:`mmseg_robust.models.backbones.strict_pretrained`), the
converters (:mod:`mmseg_robust.models.converters`) and their command lines, and
the evaluation loop (:func:`check_checkpoint_fits`: mmengine loads test
checkpoints with ``strict=False`` and only warns, so a checkpoint that does not
fit would be evaluated with randomly initialised tensors).

A mismatch is always a :class:`CheckpointError` naming every missing, unexpected
and wrongly shaped tensor.

A converted checkpoint's ``meta`` says where it comes from in one vocabulary,
:data:`CONVERSION_META_KEYS` (built by :func:`conversion_meta`), whichever
converter or tool wrote it.
"""

import os
import os.path as osp
import zipfile
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Optional, Union

import torch

__all__ = [
    'CONVERSION_META_KEYS',
    'CheckpointError',
    'conversion_meta',
    'check_checkpoint_fits',
    'check_state_dict',
    'expected_shapes',
    'load_checkpoint_file',
    'save_checkpoint',
    'unwrap_state_dict',
]

StateDict = Dict[str, torch.Tensor]

#: The command that turns a DDC-AT training checkpoint into the plain model.
EXPORT_DDCAT = 'tools/model_converters/export_ddcat.py'
#: The converter of the reference DDC-AT / SAT checkpoints (semseg naming).
CONVERT_SEMSEG = 'tools/model_converters/ddcat_semseg.py'
_LIMIT = 20  # tensor names listed per kind of mismatch


class CheckpointError(ValueError):
    """The one error for a checkpoint problem: a file that holds no state dict,
    cannot be converted (a missing tensor, another architecture, an input
    normaliser), does not fit the model (the message names the tensors), or
    whose training state cannot be resumed."""


def load_checkpoint_file(path: str, trust: bool = False, mmap: bool = False):
    """Load a checkpoint file on the CPU and return what it holds.

    Args:
        path (str): a local file.
        trust (bool): load with ``weights_only=False``: only for a file from a
            source you trust (unpickling can run arbitrary code). The command
            lines expose it as ``--unsafe-load``. Default: False.
        mmap (bool): memory-map the tensors instead of reading them (files in
            torch's zip format; others are read normally). Default: False.

    Returns:
        The loaded object (use :func:`unwrap_state_dict` for its state dict).

    Raises:
        FileNotFoundError: no such file.
        RuntimeError: this torch has no ``torch.load(weights_only=True)``.
        CheckpointError: the file cannot be loaded; the message names the file
            and, when the safe loader refused it, the ``--unsafe-load`` /
            ``trust=True`` fix.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'no such checkpoint file: {path}')
    mmap = bool(mmap) and zipfile.is_zipfile(path)
    if not trust:
        from mmseg_robust.utils.compat import has_weights_only

        if not has_weights_only():
            raise RuntimeError(
                f'cannot load the checkpoint {path} safely: torch '
                f'{torch.__version__} has no torch.load(weights_only=True). '
                'Install torch >= 2.4, or rerun with --unsafe-load (trust=True '
                'in Python) if you trust the file.'
            )
    try:
        return torch.load(path, map_location='cpu', weights_only=not trust, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file and fix
        if trust:
            raise CheckpointError(f'cannot load the checkpoint {path}: {e}') from e
        raise CheckpointError(
            f'cannot load the checkpoint {path} with torch.load(weights_only='
            f'True): {e}\nIf you trust the file (unpickling can run arbitrary '
            'code), rerun with --unsafe-load (trust=True in Python).'
        ) from e


def unwrap_state_dict(obj, source: str = 'checkpoint') -> StateDict:
    """The state dict inside a loaded checkpoint.

    Accepts a plain state dict (a non-empty dict whose values are all tensors)
    or a dict holding one under ``'state_dict'`` (mmengine, the DDC-AT reference)
    or ``'model'`` (timm, DeiT). A leading ``module.`` (DataParallel / DDP) is
    removed from every name that has one.

    Args:
        obj: what :func:`load_checkpoint_file` returned (or a state dict).
        source (str): what ``obj`` is (e.g. its path), for messages.

    Returns:
        dict: name -> tensor, in the file's order (a new dict; tensors shared).

    Raises:
        CheckpointError: no state dict found, or two names equal once
            ``module.`` is removed.
    """
    if (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        out = OrderedDict()
        for name, tensor in obj.items():
            new = name[len('module.') :] if name.startswith('module.') else name
            if new in out:
                raise CheckpointError(
                    f'{source}: {name!r} and another tensor are both {new!r} '
                    "once the DDP prefix 'module.' is removed"
                )
            out[new] = tensor
        return out
    if isinstance(obj, Mapping):
        for key in ('state_dict', 'model'):
            if isinstance(obj.get(key), Mapping) and obj[key]:
                return unwrap_state_dict(obj[key], f"{source}['{key}']")
        not_tensors = [
            k for k, v in obj.items() if not isinstance(v, (torch.Tensor, Mapping))
        ]
        raise CheckpointError(
            f'{source}: no state dict found (expected a dict of tensors, or one '
            "under 'state_dict' or 'model'); top-level keys: "
            f'{_names(map(str, obj), 10) or "none"}'
            + (
                f'; not tensors: {_names(map(str, not_tensors), 5)}'
                if not_tensors and len(not_tensors) < len(obj)
                else ''
            )
        )
    raise CheckpointError(
        f'{source}: no state dict found: a checkpoint is a '
        f'dict, this is a {type(obj).__name__}'
    )


#: The provenance keys of a converted checkpoint's ``meta``, written by every
#: converter and ``tools/model_converters/*.py``:
#:
#: - ``converter``: the converter's name (the tool's file name without ``.py``,
#:   e.g. ``'revisiting_at_convnext'``, ``'ddcat_semseg'``, ``'export_ddcat'``);
#: - ``source``: the file name of the converted checkpoint;
#: - ``config``: the config the result is meant for, as given (None when the
#:   converter takes none);
#: - ``dropped``: the names of the source tensors the result leaves out.
#:
#: Further keys describe the conversion (``arch``, ``num_classes``, ``stem``,
#: ``pos_embed_grid``, ``fresh``, ``input_normalizer``, ``layout``, ``plain``);
#: an exported training checkpoint keeps the keys mmengine wrote (``cfg``, ...).
CONVERSION_META_KEYS = ('converter', 'source', 'config', 'dropped')


def conversion_meta(
    converter: str,
    source: str,
    dropped: Iterable[str] = (),
    config: Optional[str] = None,
    **details,
) -> dict:
    """The ``meta`` of a converted checkpoint: :data:`CONVERSION_META_KEYS`,
    then ``details``.

    Example:
        >>> conversion_meta('export_ddcat', '/runs/iter_80000.pth', ['a.w'])
        {'converter': 'export_ddcat', 'source': 'iter_80000.pth', 'config': None, 'dropped': ['a.w']}
    """  # noqa: E501
    meta = dict(
        converter=str(converter),
        source=osp.basename(str(source)),
        config=None if config is None else str(config),
        dropped=[str(k) for k in dropped],
    )
    meta.update(details)  # cannot repeat a key: each is a named argument
    return meta


def save_checkpoint(
    path: str, state_dict: Mapping[str, torch.Tensor], meta: dict
) -> str:
    """Write ``{'state_dict': ..., 'meta': meta}``, loadable with
    ``torch.load(..., weights_only=True)`` (``meta`` must hold plain Python
    values only). Creates the folder. Returns ``path``."""
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    state = OrderedDict(
        (k, v.detach().cpu().contiguous()) for k, v in state_dict.items()
    )
    torch.save({'state_dict': state, 'meta': meta}, path)
    return path


def _build_model_for_shapes(model_cfg: Mapping) -> torch.nn.Module:
    """The model of a config, built on the meta device (no memory, nothing
    initialised) where possible; models that cannot be built there (mmpretrain's
    ConvNeXt calls ``.item()`` on its drop-path rates) are built on the CPU,
    still without initialising weights."""
    import mmseg.models  # noqa: F401  (registers mmseg's models)
    from mmengine.registry import DefaultScope

    import mmseg_robust.models  # noqa: F401  (registers ours)
    from mmseg_robust.registry import MODELS

    with DefaultScope.overwrite_default_scope('mmseg'):
        try:
            with torch.device('meta'):
                return MODELS.build(model_cfg)
        except (RuntimeError, NotImplementedError):
            return MODELS.build(model_cfg)


def expected_shapes(
    model: Union[torch.nn.Module, Mapping], prefix: Optional[str] = None
) -> Dict[str, torch.Size]:
    """Name -> shape of every tensor (parameters and buffers) of a model's
    state dict.

    Args:
        model (nn.Module | dict): a module (wrappers such as DDP and the
            test-time augmentation wrapper are unwrapped, as mmengine does when
            it loads a checkpoint), or the ``model`` dict of an mmseg config
            (mmseg's types and ours; built without memory on the meta device
            where possible).
        prefix (str, optional): keep only the names under this prefix, with the
            prefix removed (``'backbone.'`` for a backbone initialisation).
    """
    if isinstance(model, torch.nn.Module):
        from mmengine.model import BaseTTAModel

        from mmseg_robust.models.pixel_space import unwrap_model

        module = unwrap_model(model)
        if isinstance(module, BaseTTAModel):
            # `tools/test.py --tta`: mmengine loads the checkpoint into the
            # segmentor inside (mmengine.runner.checkpoint.load_state_dict)
            module = module.module
    else:
        module = _build_model_for_shapes(model)
    shapes = OrderedDict((k, v.shape) for k, v in module.state_dict().items())
    if prefix:
        shapes = OrderedDict(
            (k[len(prefix) :], s) for k, s in shapes.items() if k.startswith(prefix)
        )
    return shapes


def _names(names: Iterable[str], limit: int = _LIMIT) -> str:
    names = list(names)
    more = f' ... and {len(names) - limit} more' if len(names) > limit else ''
    return ', '.join(names[:limit]) + more


def check_state_dict(
    state_dict: Dict[str, torch.Tensor],
    expected: Mapping[str, Iterable[int]],
    what: str = 'the checkpoint',
    hint: Optional[str] = None,
    source_names: Optional[Mapping[str, str]] = None,
    fill_num_batches_tracked: bool = False,
) -> List[str]:
    """Check that ``state_dict`` fills ``expected`` exactly: the same names, each
    with the expected shape.

    Args:
        state_dict (dict): name -> tensor to check.
        expected (dict): name -> shape of the target model
            (:func:`expected_shapes`).
        what (str): what ``state_dict`` is, to begin the message with (e.g.
            ``'the checkpoint work_dirs/x/iter_100.pth'``).
        hint (str, optional): how to fix a mismatch, ending the message.
        source_names (dict, optional): name -> the source tensor it was
            converted from; errors then name both (``x (from y)``).
        fill_num_batches_tracked (bool): add missing ``*.num_batches_tracked``
            buffers (BatchNorm step counters, unused in eval and with a fixed
            momentum; old files lack them) as 0, in place. Default: False.

    Returns:
        list[str]: the names that were filled in.

    Raises:
        CheckpointError: naming every missing, unexpected and wrongly shaped
            tensor (each kind sorted, at most 20 listed). Nothing is filled
            then.
    """
    source_names = source_names or {}

    def name(k):
        src = source_names.get(k)
        return f'{k} (from {src})' if src and src != k else k

    fill = [
        k
        for k in expected
        if k not in state_dict
        and fill_num_batches_tracked
        and k.endswith('.num_batches_tracked')
    ]
    missing = sorted(k for k in expected if k not in state_dict and k not in fill)
    unexpected = sorted(k for k in state_dict if k not in expected)
    wrong = [
        f'{name(k)}: {tuple(state_dict[k].shape)} in the checkpoint, '
        f'{tuple(expected[k])} in the model'
        for k in sorted(state_dict)
        if k in expected and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(
            f'missing in the checkpoint ({len(missing)}): {_names(missing)}'
        )
    if unexpected:
        problems.append(
            f'not in the model ({len(unexpected)}): {_names(map(name, unexpected))}'
        )
    if wrong:
        problems.append(f'wrong shape ({len(wrong)}): ' + _names(wrong))
    if problems:
        raise CheckpointError(
            f'{what} does not fit the model:\n  '
            + '\n  '.join(problems)
            + (f'\n{hint}' if hint else '')
        )
    for k in fill:
        state_dict[k] = torch.tensor(0, dtype=torch.long)
    return fill


def _ddcat_branches(names: Iterable[str]) -> List[str]:
    """The names among ``names`` of DDC-AT's training-only decode-head branches
    (``cls2``, ``mask1`` and their bottlenecks)."""
    from mmseg_robust.models.decode_heads.ddcat_heads import DDCAT_EXTRA_BRANCHES

    prefixes = tuple(f'decode_head.{b}.' for b in DDCAT_EXTRA_BRANCHES)
    return [k for k in names if k.startswith(prefixes)]


def _mismatch_advice(path: str, state: Mapping, expected: Mapping) -> str:
    """How to fix the two mismatches with a known cure: a DDC-AT training
    checkpoint given to the plain model, a reference (semseg) checkpoint."""
    extra = _ddcat_branches(k for k in state if k not in expected)
    if extra and not _ddcat_branches(expected):
        return (
            f'{path} is a DDC-AT training checkpoint (it has the training-only '
            f'branches {", ".join(sorted({k.split(".")[1] for k in extra}))}) '
            'and the model is the plain segmentor. Export the plain model first:'
            f'\n    python {EXPORT_DDCAT} DDCAT_CONFIG {path} OUT.pth\n'
            '(DDCAT_CONFIG: the DDC-AT config it was trained with; writes '
            'OUT.pth and its config OUT.py), then use OUT.pth with OUT.py; or '
            'use the DDC-AT config itself, whose model predicts with cls1.'
        )
    if any(k.startswith('layer0.') for k in state) and any(
        k.startswith(('cls.', 'cls1.')) for k in state
    ):
        return (
            f'{path} looks like a checkpoint of the DDC-AT/SAT reference '
            '(semseg names layer0.*, cls*.*): convert it first with\n'
            f'    python {CONVERT_SEMSEG} {path} OUT.pth [--config CONFIG]'
        )
    return ''


def check_checkpoint_fits(
    path: str,
    model: torch.nn.Module,
    what: Optional[str] = None,
    hint: Optional[str] = None,
    loaded=None,
) -> None:
    """Check that the checkpoint file ``path`` fits ``model`` exactly.

    The file is loaded safely (``weights_only=True``, memory-mapped) and
    unwrapped (:func:`unwrap_state_dict`); ``model`` may be wrapped (DDP).

    Args:
        path (str): the checkpoint file.
        model (nn.Module): the model it is meant for.
        what (str, optional): what the file is, to begin the message with.
            Default: ``'the checkpoint <path>'``.
        hint (str, optional): how to fix a mismatch. Default: check the class
            count and architecture, convert foreign checkpoints. A checkpoint
            with a known cure (a DDC-AT training checkpoint given to the plain
            model: ``tools/model_converters/export_ddcat.py``; a reference
            DDC-AT/SAT file: ``tools/model_converters/ddcat_semseg.py``) gets
            that cure, with its command line, before the hint.
        loaded (optional): the file's content, already loaded (e.g. the dict
            mmengine's ``Runner.load_checkpoint`` read): checked without
            reading the file again. Default: the file is loaded here.

    Raises:
        FileNotFoundError / RuntimeError: see :func:`load_checkpoint_file`.
        CheckpointError: the file cannot be loaded or holds no state dict, or
            it does not fit ``model`` (naming the tensors and the fix).
    """
    if loaded is None:
        loaded = load_checkpoint_file(path, mmap=True)
    state = unwrap_state_dict(loaded, path)
    expected = expected_shapes(model)
    if hint is None:
        hint = (
            'Check num_classes and the architecture in the config; convert '
            'foreign checkpoints with the tools in tools/model_converters/.'
        )
    try:
        check_state_dict(state, expected, what=what or f'the checkpoint {path}')
    except CheckpointError as e:
        advice = _mismatch_advice(path, state, expected)
        message = '\n'.join(m for m in (str(e), advice, hint) if m)
        raise CheckpointError(message) from None
