"""Opt-in ways to make the attack's forward+backward passes cheaper
(docs/algorithms.md section 1, "Cheaper passes").

An attack spends almost all its time in forward and input-gradient passes
through the pixel-space view (:class:`~mmseg_robust.models.SegmentorPixelView`).
Three options make them cheaper; each is off by default and named in
``evaluator.speedups``:

- ``'channels_last'``: the model's 4-D weights and the network input in the
  channels-last memory format (faster convolutions on GPUs with tensor cores).
  The weights are converted for the attack of a batch and put back afterwards,
  so the model is unchanged for everything else (training, checkpoints).
- ``'compile'``: the segmentor's ``inference`` compiled with ``torch.compile``
  (its default backend, inductor), once per segmentor; a new image or batch
  shape recompiles (and after the first, torch marks the shapes dynamic).
- ``'bf16'``: the segmentor runs under bf16 autocast on a CUDA device that
  supports bf16; refused on the CPU and on other GPUs.

The view normalises and pads its input, and crops, flips and resizes the logits
as without the options: only the segmentor's ``inference`` call changes, and its
logits are cast to float32, so attacks and losses still see fp32 logits.
``channels_last`` and ``compile`` change the results only by float round-off
(other kernels, another summation order); ``bf16`` by more. All three enter the
result cache's key, so results computed with and without them are never mixed.
"""

import contextlib
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ['SPEEDUPS', 'CheaperPasses', 'check_bf16', 'resolve_speedups']

#: The names ``evaluator.speedups`` takes, in the order they are applied.
SPEEDUPS = ('channels_last', 'compile', 'bf16')


def resolve_speedups(value: Union[None, str, Iterable[str]]) -> Tuple[str, ...]:
    """The speed options named by ``value``, validated, in :data:`SPEEDUPS` order.

    Args:
        value: None, ``''``, ``'none'`` or an empty list (none); a name, a
            comma-separated text (``'channels_last,bf16'``, as
            ``--cfg-options evaluator.speedups=channels_last,bf16`` may give
            it) or a list of names.

    Returns:
        tuple[str]: the names, each once.

    Raises:
        ValueError: for a name not in :data:`SPEEDUPS`, or a value of another
            type.
    """
    if value is None or value is False:
        return ()
    if isinstance(value, str):
        names = [n.strip() for n in value.split(',')]
    elif isinstance(value, (list, tuple, set, frozenset)):
        names = []
        for item in value:
            if not isinstance(item, str):
                raise ValueError(
                    f'evaluator.speedups must name options as text, got {item!r} '
                    f'in {value!r}; choose from {list(SPEEDUPS)}'
                )
            names += [n.strip() for n in item.split(',')]
    else:
        raise ValueError(
            f'evaluator.speedups must be a list of names or comma-separated text, '
            f'got {value!r}; choose from {list(SPEEDUPS)}'
        )
    names = [n for n in names if n and n.lower() != 'none']
    unknown = sorted(set(names) - set(SPEEDUPS))
    if unknown:
        raise ValueError(
            f'unknown evaluator.speedups {unknown}; choose from {list(SPEEDUPS)} '
            '(e.g. evaluator.speedups=channels_last,compile), or leave it out'
        )
    return tuple(n for n in SPEEDUPS if n in names)


def check_bf16(device: Union[str, torch.device]) -> None:
    """Raise ``ValueError`` unless ``device`` runs bf16 autocast: a CUDA device
    with bf16 support (Ampere or newer)."""
    device = torch.device(device)
    if device.type != 'cuda':
        raise ValueError(
            f"evaluator.speedups 'bf16' needs a CUDA GPU with bf16 support; the "
            f'model is on {device.type!r}. Remove bf16 from evaluator.speedups '
            '(channels_last and compile work on the CPU too)'
        )
    if not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"evaluator.speedups 'bf16': {torch.cuda.get_device_name(device)} does "
            'not support bf16 (Ampere or newer GPUs do); remove bf16 from '
            'evaluator.speedups'
        )


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device('cpu')


class CheaperPasses:
    """The speed options of an evaluation, applied where a pixel-space view
    calls its segmentor.

    One instance serves every batch of an evaluation: it holds the compiled
    ``inference`` of its segmentor (compiled once, on first use).

    Args:
        speedups: names from :data:`SPEEDUPS` (see :func:`resolve_speedups`).
        compile_options (dict, optional): keyword arguments of
            ``torch.compile`` (e.g. ``backend='aot_eager'``); default: torch's
            defaults (inductor).

    Example:
        >>> passes = CheaperPasses(['channels_last', 'compile'])
        >>> with passes.applied(model):
        ...     view = SegmentorPixelView(model, data_batch, passes=passes)
        ...     adv = attack(view, view.images, view.labels)
    """

    def __init__(
        self,
        speedups: Union[None, str, Sequence[str]] = None,
        compile_options: Optional[dict] = None,
    ) -> None:
        self.names = resolve_speedups(speedups)
        self.compile_options = dict(compile_options or {})
        self._compiled: Optional[tuple] = None  # (segmentor, compiled inference)

    def __bool__(self) -> bool:
        return bool(self.names)

    def __repr__(self) -> str:
        return f'CheaperPasses({list(self.names)})'

    def check(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError`` when an option cannot run where ``model`` is
        (``bf16`` off a bf16-capable GPU)."""
        if 'bf16' in self.names:
            check_bf16(_model_device(model))

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """Context in which ``model`` (an unwrapped segmentor) has its 4-D
        weights and buffers channels-last (with ``'channels_last'``); they
        are put back in their own memory format on exit, also on errors."""
        self.check(model)
        if 'channels_last' not in self.names:
            yield
            return
        changed: List[Tensor] = []
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if t.dim() == 4 and not t.is_contiguous(
                    memory_format=torch.channels_last
                ):
                    # .data keeps the Parameter objects (an optimiser's
                    # references stay valid)
                    t.data = t.data.contiguous(memory_format=torch.channels_last)
                    changed.append(t)
        try:
            yield
        finally:
            with torch.no_grad():
                for t in changed:
                    t.data = t.data.contiguous()

    def inference(
        self, model: torch.nn.Module, inputs: Tensor, metas: List[dict]
    ) -> Tensor:
        """``model.inference(inputs, metas)`` with the options, as float32."""
        if not self.names:
            return model.inference(inputs, metas)
        if 'channels_last' in self.names:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        run = self._compiled_inference(model) if 'compile' in self.names else None
        run = run or model.inference
        if 'bf16' in self.names:
            with torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16):
                logits = run(inputs, metas)
        else:
            logits = run(inputs, metas)
        # the rest of the view (crop, flip, resize) and the losses in fp32;
        # contiguous: channels-last logits would stay so through the losses
        return logits.float().contiguous()

    def _compiled_inference(self, model: torch.nn.Module):
        if self._compiled is None or self._compiled[0] is not model:
            self._compiled = (
                model,
                torch.compile(model.inference, **self.compile_options),
            )
        return self._compiled[1]
