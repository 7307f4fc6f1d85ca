"""Per-pixel attack objectives (docs/algorithms.md section 2). All are maximised.

Each objective maps logits ``z`` ``(B, K, H, W)`` and labels ``y`` ``(B, H, W)`` to a
per-pixel loss; the per-image objective is the sum over valid pixels divided by
``H*W`` (all pixels, not the valid or correct ones). Correctness masks and
weighting factors are recomputed from the current logits at every call and detached.

Objectives are registered in ``OBJECTIVES`` (not ``ATTACKS``) under the spec's
names::

    CE, Mask-CE, Mask-CE-Bal, JS-Avg, SegPGD, CosPGD, Mask-Sph, Tsallis-CE

and attacks build them from a name or a config dict (``loss='Mask-CE'`` or
``loss=dict(type='Mask-CE-Bal', class_weights='voc')``).
"""

import json
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from mmseg_robust.registry import OBJECTIVES

from .seg_logits import SegLogits, check_labels, effective_valid

__all__ = [
    'OBJECTIVE_NAMES',
    'BalancedMaskedCrossEntropy',
    'CosPGDLoss',
    'CrossEntropy',
    'JensenShannonDivergence',
    'MaskedCrossEntropy',
    'MaskedSphericalLoss',
    'Objective',
    'SegPGDLoss',
    'TsallisCrossEntropy',
    'build_objective',
    'class_weights_from_counts',
    'count_label_pixels',
    'load_class_weights',
    'objective_names',
]

#: Names of the objectives of docs/algorithms.md section 2, in the order of its table.
OBJECTIVE_NAMES = (
    'CE',
    'Mask-CE',
    'Mask-CE-Bal',
    'JS-Avg',
    'SegPGD',
    'CosPGD',
    'Mask-Sph',
    'Tsallis-CE',
)

ClassWeights = Union[str, Sequence[float], Tensor]

_CLASS_WEIGHTS_FILE = (
    Path(__file__).resolve().parent / 'data' / 'sea_class_weights.json'
)
_LOG2 = math.log(2.0)


class Objective:
    """Base class of per-pixel attack objectives (docs/algorithms.md section 2).

    Subclasses implement :meth:`pixel_loss` on a :class:`SegLogits`; calling an
    objective returns the per-image objective.

    Args:
        ignore_index (int): label value excluded from the objective (used when the
            objective is called directly; attacks pass their own valid mask).
            Default: 255.

    Call:
        ``obj(logits, labels, valid=None, step=1, total_steps=1) -> Tensor (B,)``
        with logits ``(B, K, H, W)`` float, labels long ``(B, H, W)``, valid bool
        ``(B, H, W)`` (False = padding), ``step`` the 1-based attack step of
        ``total_steps``.

    Example:
        >>> obj = OBJECTIVES.build(dict(type='Mask-CE'))
        >>> per_image = obj(logits, labels)  # (B,)
    """

    #: Registered name (the spec's), set by subclasses.
    name: str = ''

    def __init__(self, ignore_index: int = 255) -> None:
        self.ignore_index = ignore_index

    def pixel_loss(self, s: SegLogits) -> Tensor:
        """Per-pixel loss ``(B, H, W)`` to maximise."""
        raise NotImplementedError

    def check_num_classes(self, num_classes: int) -> None:
        """Hook for objectives with per-class parameters; raise ``ValueError`` on a
        mismatch with the model's K. Attacks call it once per run."""

    def from_logits(self, s: SegLogits) -> Tensor:
        """Per-image objective ``(B,)`` = sum over valid pixels / (H*W)."""
        return s.reduce(self.pixel_loss(s))

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        valid: Optional[Tensor] = None,
        step: int = 1,
        total_steps: int = 1,
    ) -> Tensor:
        if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f'expected logits (B, K, H, W) and labels (B, H, W), got '
                f'{tuple(logits.shape)} and {tuple(labels.shape)}'
            )
        labels = labels.long()
        check_labels(labels, logits.shape[1], self.ignore_index, valid)
        self.check_num_classes(logits.shape[1])
        mask = effective_valid(labels, valid, self.ignore_index)
        safe = torch.where(mask, labels, 0)
        return self.from_logits(SegLogits(logits, safe, mask, step, total_steps))

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


@OBJECTIVES.register_module(name='CE')
class CrossEntropy(Objective):
    """Pixel-wise cross-entropy ``CE_i`` (section 2, 'CE').

    Args:
        ignore_index (int): label value excluded. Default: 255.

    Example:
        >>> obj = OBJECTIVES.build(dict(type='CE'))
        >>> per_image = obj(logits, labels)  # (B,)
    """

    name = 'CE'

    def pixel_loss(self, s: SegLogits) -> Tensor:
        return s.ce


@OBJECTIVES.register_module(name='Mask-CE')
class MaskedCrossEntropy(Objective):
    """Masked cross-entropy ``correct_i * CE_i`` (Croce et al., ECCV 2024, section 2
    'Mask-CE'): a pixel drops out as soon as it is misclassified and returns if it
    becomes correct again.

    Args:
        ignore_index (int): label value excluded. Default: 255.

    Example:
        >>> obj = OBJECTIVES.build(dict(type='Mask-CE'))
        >>> per_image = obj(logits, labels)  # (B,)
    """

    name = 'Mask-CE'

    def pixel_loss(self, s: SegLogits) -> Tensor:
        return torch.where(s.correct, s.ce, 0.0)


@OBJECTIVES.register_module(name='Mask-CE-Bal')
class BalancedMaskedCrossEntropy(Objective):
    """Class-balanced masked cross-entropy ``correct_i * w[y_i] * CE_i`` (Croce et al.,
    ECCV 2024, section 2 'Mask-CE-Bal'), with a fixed class-weight vector ``w``
    (section 2.1), used as shipped, without renormalisation.

    Args:
        class_weights (str | sequence of float | Tensor): ``'voc'`` (21 classes) or
            ``'ade20k'`` (151 entries, as shipped by the reference) for the shipped
            vectors, or an explicit vector of length K (see
            :func:`class_weights_from_counts` to compute one). Required.
        ignore_index (int): label value excluded. Default: 255.

    Example:
        >>> obj = OBJECTIVES.build(dict(type='Mask-CE-Bal', class_weights='voc'))
        >>> per_image = obj(logits, labels)  # (B,), logits with K=21
    """

    name = 'Mask-CE-Bal'

    def __init__(
        self, class_weights: ClassWeights = None, ignore_index: int = 255
    ) -> None:
        super().__init__(ignore_index)
        if class_weights is None:
            raise ValueError(
                "Mask-CE-Bal needs class weights: pass class_weights='voc' | "
                "'ade20k' | a list of K per-class weights"
            )
        self.class_weights = load_class_weights(class_weights)
        self._on_device: Dict[torch.device, Tensor] = {}

    def check_num_classes(self, num_classes: int) -> None:
        n = self.class_weights.numel()
        if n != num_classes:
            raise ValueError(
                f'Mask-CE-Bal has {n} class weights but the model predicts '
                f'K={num_classes} classes; pass class_weights with one weight per '
                f"class ('voc' has 21, 'ade20k' 151)"
            )

    def pixel_loss(self, s: SegLogits) -> Tensor:
        device = s.logits.device
        w = self._on_device.get(device)
        if w is None:
            w = self._on_device[device] = self.class_weights.to(device)
        weighted = w[s.labels] * s.ce
        return torch.where(s.correct, weighted, 0.0)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(num_classes={self.class_weights.numel()})'


@OBJECTIVES.register_module(name='JS-Avg')
class JensenShannonDivergence(Objective):
    """Jensen-Shannon divergence between ``p_i = softmax(z_i)`` and
    ``onehot(y_i)`` (Croce et al., ECCV 2024, section 2 'JS-Avg'); no correctness
    mask, bounded by ``log 2``.

    With ``q`` one-hot and ``m = (p + q) / 2`` the divergence depends on
    ``p_y`` only:
    ``JS = log 2 + (p_y log p_y - (1 + p_y) log(1 + p_y)) / 2``,
    computed from ``log p_y`` (log-softmax), so saturated logits give neither NaN
    values nor NaN gradients (the reference's ``log m`` can hit ``log 0``).

    Args:
        ignore_index (int): label value excluded. Default: 255.

    Example:
        >>> obj = OBJECTIVES.build(dict(type='JS-Avg'))
        >>> per_image = obj(logits, labels)  # (B,), each <= log 2
    """

    name = 'JS-Avg'

    def pixel_loss(self, s: SegLogits) -> Tensor:
        log_py = s.label_log_prob
        py = log_py.exp()
        # 0.5 * (KL(p||m) + KL(q||m)) in closed form; exp(l) * l -> 0 as l -> -inf.
        return _LOG2 + 0.5 * (py * log_py - (1.0 + py) * torch.log1p(py))


@OBJECTIVES.register_module(name='SegPGD')
class SegPGDLoss(Objective):
    """SegPGD objective (Gu et al., ECCV 2022; section 2 'SegPGD'): at step ``t`` of
    ``T``, ``lambda_t = (t - 1) / (2T)`` and the per-pixel loss is
    ``(1 - lambda_t) * correct_i * CE_i + lambda_t * (1 - correct_i) * CE_i``.

    Args:
        ignore_index (int): label value excluded. Default: 255.

    Example:
        >>> obj = OBJECTIVES.build(dict(type='SegPGD'))
        >>> per_image = obj(logits, labels, step=3, total_steps=10)  # (B,)
    """

    name = 'SegPGD'

    def pixel_loss(self, s: SegLogits) -> Tensor:
        lam = (s.step - 1) / (2.0 * max(s.total_steps, 1))
        return s.ce * torch.where(s.correct, 1.0 - lam, lam)


@OBJECTIVES.register_module(name='CosPGD')
class CosPGDLoss(Objective):
    """CosPGD objective (Agnihotri et al., ICML 2024; section 2 'CosPGD'):
    ``cos(act(z_i), onehot(y_i)) * CE_i`` with the cosine factor detached.

    Args:
        activation (str): ``'softmax'`` (default, the paper) or ``'sigmoid'``
            (the variant in the SEA reference code).
        ignore_index (int): label value excluded. Default: 255.

    Example:
        >>> obj = OBJECTIVES.build(dict(type='CosPGD', activation='softmax'))
        >>> per_image = obj(logits, labels)  # (B,)
    """

    name = 'CosPGD'

    def __init__(self, activation: str = 'softmax', ignore_index: int = 255) -> None:
        super().__init__(ignore_index)
        if activation not in ('softmax', 'sigmoid'):
            raise ValueError(
                f"CosPGD activation must be 'softmax' or 'sigmoid', got {activation!r}"
            )
        self.activation = activation

    def pixel_loss(self, s: SegLogits) -> Tensor:
        with torch.no_grad():
            if self.activation == 'softmax':
                probs = s.log_probs.detach().exp()
            else:
                probs = s.logits.detach().sigmoid()
            # cos(a, onehot(y)) = a_y / ||a||_2
            a_y = probs.gather(1, s.labels.unsqueeze(1)).squeeze(1)
            cos = a_y / probs.norm(p=2, dim=1).clamp_min(1e-12)
        return cos * s.ce

    def __repr__(self) -> str:
        return f'{type(self).__name__}(activation={self.activation!r})'


@OBJECTIVES.register_module(name='Mask-Sph')
class MaskedSphericalLoss(Objective):
    """Masked spherical loss ``-correct_i * z_{i, y_i} / ||z_i||_2`` (Croce et al.,
    2023 four-loss SEA; section 2 'Mask-Sph').

    Args:
        ignore_index (int): label value excluded. Default: 255.

    Example:
        >>> obj = OBJECTIVES.build(dict(type='Mask-Sph'))
        >>> per_image = obj(logits, labels)  # (B,)
    """

    name = 'Mask-Sph'

    def pixel_loss(self, s: SegLogits) -> Tensor:
        z_y = s.logits.gather(1, s.labels.unsqueeze(1)).squeeze(1)
        loss = -z_y / s.logits.norm(p=2, dim=1).clamp_min(1e-12)
        return torch.where(s.correct, loss, 0.0)


@OBJECTIVES.register_module(name='Tsallis-CE')
class TsallisCrossEntropy(Objective):
    """Tsallis cross-entropy with a linear ``q`` schedule (Matyasko et al.,
    TsallisPGD, IJCNN 2026; docs/algorithms.md section 2 'Tsallis-CE').

    With the Tsallis ``q``-logarithm ``ln_q(x) = (x^(1 - q) - 1) / (1 - q)``
    (``ln_1 = ln``) and ``p_y = softmax(z_i)_{y_i}`` the per-pixel loss is
    ``-ln_q(p_y) = (1 - p_y^(1 - q)) / (1 - q)``, the CE at ``q = 1``. At step
    ``t`` of ``T`` (:class:`~mmseg_robust.attacks.SegLogits`' ``step`` and
    ``total_steps``) ``q = q_start + (q_end - q_start) (t - 1) / (T - 1)``
    (``q_start`` for ``T = 1``; steps past ``T`` keep ``q_end``): from -2, a
    bounded loss ``(1 - p_y^3) / 3`` that weighs every pixel alike, to the CE,
    which concentrates on the pixels still correct with high confidence. In an
    :class:`~mmseg_robust.attacks.APGDLargeEps` (SEA) the schedule restarts
    with each radius stage (each stage is a run of its own).

    Computed as ``-expm1((1 - q) log p_y) / (1 - q)`` from the log-softmax, so
    saturated logits give neither NaN values nor NaN gradients and ``q``
    close to 1 loses no precision; ``q = 1`` is the CE itself.

    Args:
        q_start (float): ``q`` at the first step. Default: -2.
        q_end (float): ``q`` at the last step. Default: 1 (the CE).
        ignore_index (int): label value excluded. Default: 255.

    Example:
        >>> obj = OBJECTIVES.build(dict(type='Tsallis-CE'))
        >>> per_image = obj(logits, labels, step=1, total_steps=300)  # q = -2
    """

    name = 'Tsallis-CE'

    def __init__(
        self, q_start: float = -2.0, q_end: float = 1.0, ignore_index: int = 255
    ) -> None:
        super().__init__(ignore_index)
        for key, value in (('q_start', q_start), ('q_end', q_end)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(
                    f'Tsallis-CE {key} must be a finite number, got {value!r}'
                )
        self.q_start, self.q_end = float(q_start), float(q_end)

    def q(self, step: int, total_steps: int) -> float:
        """``q`` at ``step`` (1-based) of ``total_steps``."""
        frac = (step - 1) / max(total_steps - 1, 1)
        frac = min(max(frac, 0.0), 1.0)
        return self.q_start + (self.q_end - self.q_start) * frac

    def pixel_loss(self, s: SegLogits) -> Tensor:
        a = 1.0 - self.q(s.step, s.total_steps)
        if a == 0.0:
            return s.ce
        return -torch.expm1(a * s.label_log_prob) / a

    def __repr__(self) -> str:
        return f'{type(self).__name__}(q_start={self.q_start:g}, q_end={self.q_end:g})'


# --------------------------------------------------------------------------------
# building and class weights
# --------------------------------------------------------------------------------
def objective_names() -> list:
    """Names of all objectives registered in ``OBJECTIVES`` (spec names first)."""
    OBJECTIVES.import_from_location()
    names = [
        name
        for name, cls in OBJECTIVES.module_dict.items()
        if isinstance(cls, type) and issubclass(cls, Objective)
    ]
    return [n for n in OBJECTIVE_NAMES if n in names] + sorted(
        n for n in names if n not in OBJECTIVE_NAMES
    )


def build_objective(cfg: Union[str, dict, Objective], **defaults) -> Objective:
    """Build an objective from a registered name, a config dict or an instance.

    Args:
        cfg: ``'Mask-CE'``, ``dict(type='Mask-CE-Bal', class_weights='voc')`` or an
            :class:`Objective` instance (returned as is).
        **defaults: keyword arguments used where ``cfg`` does not set them
            (e.g. ``ignore_index``).

    Raises:
        ValueError: unknown name (the message lists the available ones).
    """
    if isinstance(cfg, Objective):
        return cfg
    if isinstance(cfg, str):
        cfg = dict(type=cfg)
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise TypeError(
            f"loss must be an objective name, a dict with a 'type' key or an "
            f'Objective instance, got {cfg!r}'
        )
    args = dict(cfg)
    name = args.pop('type')
    cls = name if isinstance(name, type) else OBJECTIVES.get(name)
    known = isinstance(cls, type) and issubclass(cls, Objective)
    if not known:
        raise ValueError(
            f'unknown attack objective {name!r}; available: '
            f'{", ".join(objective_names())}'
        )
    for key, value in defaults.items():
        args.setdefault(key, value)
    return cls(**args)


def load_class_weights(class_weights: ClassWeights) -> Tensor:
    """Class-weight vector for Mask-CE-Bal (section 2.1) as a float32 CPU tensor.

    Args:
        class_weights: ``'voc'`` (21 entries) or ``'ade20k'`` (151 entries, used
            exactly as shipped by the SEA reference), or an explicit 1-d sequence or
            tensor of non-negative finite weights.
    """
    if isinstance(class_weights, str):
        with open(_CLASS_WEIGHTS_FILE, encoding='utf-8') as f:
            table = {k: v for k, v in json.load(f).items() if not k.startswith('_')}
        key = class_weights.lower()
        if key not in table:
            raise ValueError(
                f'unknown class-weight vector {class_weights!r}; shipped: '
                f'{", ".join(sorted(table))}, or pass a list of per-class weights'
            )
        return torch.tensor(table[key], dtype=torch.float32)
    weights = torch.as_tensor(class_weights, dtype=torch.float32).detach().cpu()
    if weights.dim() != 1 or weights.numel() == 0:
        raise ValueError(
            f'class_weights must be a 1-d vector with one weight per class, got '
            f'shape {tuple(weights.shape)}'
        )
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError('class_weights must be finite and non-negative')
    return weights.clone()


def count_label_pixels(
    labels: Tensor, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """Pixel count per class of label maps (any shape), long ``(num_classes,)``;
    ``ignore_index`` is skipped. Sum these over a training set and pass the total to
    :func:`class_weights_from_counts`."""
    flat = labels.reshape(-1).long()
    flat = flat[(flat != ignore_index) & (flat >= 0) & (flat < num_classes)]
    return torch.bincount(flat.cpu(), minlength=num_classes)


def class_weights_from_counts(counts: Union[Sequence[int], Tensor]) -> Tensor:
    """Normalised inverse pixel frequency (section 2.1): ``w_c ∝ 1 / count_c``,
    summing to 1. Classes that never occur get weight 0."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    inv = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
    if float(inv.sum()) == 0:
        raise ValueError('class_weights_from_counts: all class counts are zero')
    return (inv / inv.sum()).float()
