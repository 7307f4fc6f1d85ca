"""Self-checks of a robustness evaluation, recorded as flags (docs/flags.md).

A robustness number is only as good as the attack that produced it: a model
whose inference is random, whose input gradients are zero or not finite, whose
outputs are already probabilities, whose BatchNorm statistics move during the
attack, or which is not accurate in the first place gives numbers that
overestimate (or mean nothing about) its robustness. The checks here find such
cases and describe each as a :class:`Flag` (a code, a level, what was found and
how to fix it); docs/flags.md has one section per code.

Every check is a small function on tensors (or on the per-image records of
:func:`~mmseg_robust.evaluation.image_record`) and needs no Runner:

- before the attack, on the first attacked batch (:func:`pre_attack_checks`:
  one extra clean forward and one input-gradient pass): ``nonfinite_logits``
  (error), ``stochastic_inference``, ``probability_outputs``,
  ``nonfinite_gradients``, ``zero_gradients``, ``train_mode``;
- on every attacked batch: ``labels_out_of_range`` (error,
  :func:`check_labels`);
- during and after every attack: ``nonfinite_logits`` (error) at the
  attacked points (:class:`LogitsWatch`, :func:`check_attacked_logits`) and
  ``invalid_adversarial_images`` (error, :func:`check_adversarial_images`);
- after the first batch's attack: ``buffers_changed``
  (:func:`buffer_snapshot`, :func:`check_buffers`), ``train_mode``, and on the
  returned adversarial images ``dynamic_model`` (:func:`check_dynamic_model`,
  :func:`forward_calls_autograd`) and ``prediction_mismatch``
  (:func:`check_recorded_prediction`);
- at the end, on all images (:func:`final_checks`): ``clean_near_chance``,
  ``robust_above_clean`` (and :func:`above_clean_counts`, information),
  ``robust_rises_with_eps`` and ``image_accuracy_rises_with_eps`` (the attack
  outcome against the radius), ``attack_unconverged`` (APGD still improving at
  its end).

:class:`~mmseg_robust.evaluation.RobustnessEvaluator` runs them
(``self_checks=True``, the default of
:class:`~mmseg_robust.engine.AdversarialTestLoop`) and raises
:class:`SelfCheckError` (a ``ValueError``) for errors; the test loop logs every
flag once and its outputs carry the flags to
:class:`~mmseg_robust.evaluation.RobustnessMetric`, which writes them into the
results file (``flags``) and the report shows them.
"""

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .counts import pixel_accuracy

__all__ = [
    'FLAGS_DOC',
    'FLAG_CODES',
    'Flag',
    'LogitsWatch',
    'SelfCheckError',
    'above_clean_counts',
    'buffer_snapshot',
    'check_adversarial_images',
    'check_attack_unconverged',
    'check_attacked_logits',
    'check_buffers',
    'check_clean_accuracy',
    'check_dynamic_model',
    'check_image_accuracy_rises_with_eps',
    'check_finite_logits',
    'check_input_gradients',
    'check_labels',
    'check_log_probability_outputs',
    'check_probability_outputs',
    'check_recorded_prediction',
    'check_robust_above_clean',
    'check_robust_rises_with_eps',
    'check_stochastic',
    'check_train_mode',
    'clean_input_gradient',
    'final_checks',
    'forward_calls_autograd',
    'merge_flags',
    'pre_attack_checks',
    'raise_errors',
]

#: where every flag is explained (one section per code)
FLAGS_DOC = 'docs/flags.md'

#: flag code -> level
FLAG_CODES = OrderedDict(
    nonfinite_logits='error',
    labels_out_of_range='error',
    stochastic_inference='warning',
    train_mode='warning',
    buffers_changed='warning',
    nonfinite_gradients='warning',
    zero_gradients='warning',
    probability_outputs='warning',
    clean_near_chance='warning',
    robust_above_clean='warning',
    attack_warning='warning',
    invalid_adversarial_images='error',
    dynamic_model='warning',
    prediction_mismatch='warning',
    robust_rises_with_eps='warning',
    image_accuracy_rises_with_eps='warning',
    large_radius_probe='warning',
    gradient_free_probe='warning',
    attack_unconverged='warning',
)

LEVELS = ('warning', 'error')


@dataclass
class Flag:
    """One finding of the self-checks.

    Attributes:
        code (str): one of :data:`FLAG_CODES` (a section of docs/flags.md).
        level (str): ``'warning'`` (the numbers may overestimate robustness) or
            ``'error'`` (the evaluation is meaningless and is not run).
        message (str): what was found, with the numbers.
        fix (str): what to do about it.
        details (dict): the measured values (JSON-friendly).
    """

    code: str
    level: str
    message: str
    fix: str
    details: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f'flag level must be one of {LEVELS}, got {self.level!r}')

    def to_json(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        """One log line: level, code, message, fix and where it is explained."""
        return (
            f'Self-check {self.level} [{self.code}]: {self.message} '
            f'Fix: {self.fix} (see {FLAGS_DOC}#{self.code})'
        )


class SelfCheckError(ValueError):
    """An error-level flag: the evaluation would be meaningless."""

    def __init__(self, flags: Sequence[Flag]) -> None:
        self.flags = list(flags)
        super().__init__('\n'.join(f.text() for f in self.flags))


def raise_errors(flags: Iterable[Flag]) -> None:
    """Raise :class:`SelfCheckError` if any flag is an error."""
    errors = [f for f in flags if f.level == 'error']
    if errors:
        raise SelfCheckError(errors)


def merge_flags(*groups: Iterable[Flag]) -> List[Flag]:
    """The flags of several groups (e.g. ranks), one per code (the first)."""
    seen, out = set(), []
    for group in groups:
        for f in group:
            if f.code not in seen:
                seen.add(f.code)
                out.append(f)
    return out


# ------------------------------------------------------------ forward checks
def check_finite_logits(logits: Tensor) -> Optional[Flag]:
    """``nonfinite_logits`` (error): NaN or inf in the clean logits."""
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return None
    bad = int((~finite).sum())
    return Flag(
        'nonfinite_logits',
        'error',
        f'the clean logits contain {bad} NaN/inf values (of {logits.numel()}): '
        'predictions and attacks on them are meaningless.',
        'check the checkpoint (does it load, was training stable?), the data '
        "preprocessor's mean/std and the input range; evaluate in fp32.",
        dict(nonfinite=bad, total=int(logits.numel())),
    )


def check_stochastic(
    first: Tensor, second: Tensor, rtol: float = 1e-4, pixel_share: float = 1e-3
) -> Optional[Flag]:
    """``stochastic_inference``: two forward passes of the same clean batch
    disagree.

    Args:
        first, second (Tensor): logits ``(B, K, H, W)`` of the two passes.
        rtol (float): largest allowed per-image relative L2 difference of the
            logits (numerical noise of deterministic kernels is ~1e-6).
        pixel_share (float): largest allowed share of pixels whose predicted
            class differs.
    """
    a, b = first.detach().float(), second.detach().float()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return None  # nonfinite_logits speaks for itself
    diff = (a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-12)
    rel = float(diff.max())
    changed = float((a.argmax(1) != b.argmax(1)).float().mean())
    if rel <= rtol and changed <= pixel_share:
        return None
    return Flag(
        'stochastic_inference',
        'warning',
        f'two forward passes of the same clean batch differ (relative logit '
        f'difference {rel:.2e}, predictions differ on {100 * changed:.2f}% of the '
        'pixels): the model is random at inference, so attacks follow noisy '
        'gradients and the robust numbers are not reproducible.',
        'make inference deterministic: no dropout or random layers in eval mode '
        "(mmseg's SegNeXt LightHamHead draws random bases at every forward: set "
        'ham_kwargs=dict(rand_init=False) in its decode_head), or attack the '
        'expectation over the randomness (EOT).',
        dict(relative_difference=rel, changed_pixels=changed),
    )


def check_probability_outputs(
    logits: Tensor, atol: float = 1e-4, sum_tol: float = 1e-3
) -> Optional[Flag]:
    """``probability_outputs``: every output is in [0, 1], i.e. the model
    applied a softmax (the outputs also sum to 1 over the classes at every
    pixel, to ``sum_tol``) or a sigmoid per class (they do not). Logits that
    all lie in [0, 1] cannot be told from sigmoid outputs and are reported
    too: they cannot express a confident prediction either."""
    x = logits.detach().float()
    if x.shape[1] < 2 or not bool(torch.isfinite(x).all()):
        return None
    if float(x.min()) < -atol or float(x.max()) > 1 + atol:
        return None
    err = float((x.sum(1) - 1).abs().max())
    if err <= sum_tol:
        found = (
            'the model outputs look like probabilities (all in [0, 1], summing '
            f'to 1 over the {x.shape[1]} classes at every pixel, max deviation '
            f'{err:.1e})'
        )
        kind = 'softmax'
    else:
        found = (
            'the model outputs look like per-class probabilities of a sigmoid '
            f'(all in [0, 1], not summing to 1 over the {x.shape[1]} classes: '
            f'max deviation {err:.2g})'
        )
        kind = 'sigmoid'
    return Flag(
        'probability_outputs',
        'warning',
        f'{found}: the attacks expect logits; on probabilities their losses '
        'saturate and their gradients vanish.',
        'return the logits: remove the softmax (or sigmoid) at the end of the '
        'model, e.g. the one of a wrapper or of a custom decode head.',
        dict(kind=kind, max_sum_deviation=err),
    )


def check_log_probability_outputs(
    logits: Tensor, atol: float = 1e-4, lse_tol: float = 1e-3
) -> Optional[str]:
    """Information, not a flag: the outputs are log-probabilities (a
    log-softmax was applied): all <= 0 with ``logsumexp`` over the classes 0
    at every pixel (to ``lse_tol``), which logits practically never are.

    Harmless for the softmax-based objectives (CE, Mask-CE, Mask-CE-Bal,
    JS-Avg, SegPGD, CosPGD with its default softmax): ``softmax(log p) = p``,
    so their values and gradients are those of the logits. Returns the text
    to log, or None.
    """
    x = logits.detach().float()
    if x.shape[1] < 2 or not bool(torch.isfinite(x).all()):
        return None
    if float(x.max()) > atol:
        return None
    err = float(torch.logsumexp(x, dim=1).abs().max())
    if err > lse_tol:
        return None
    return (
        'the model outputs look like log-probabilities (a log-softmax: all <= '
        f'0, logsumexp over the {x.shape[1]} classes 0 at every pixel, max '
        f'deviation {err:.1e}). Not a problem for the softmax-based losses '
        '(CE, Mask-CE, Mask-CE-Bal, JS-Avg, SegPGD, CosPGD with softmax: '
        'softmax(log p) = p); losses on the raw outputs (Mask-Sph, CosPGD with '
        "activation='sigmoid') see other values than on logits "
        f'({FLAGS_DOC}, probability_outputs).'
    )


def clean_input_gradient(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    ignore_index: int = 255,
) -> tuple:
    """Logits and the input gradient of the mean cross-entropy at the clean
    images (one forward and one backward; parameter gradients are untouched).

    Returns:
        tuple: ``(logits, grad)``; ``grad`` is None when the logits do not
        depend on the input through autograd (a detached input path).
    """
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        if not logits.requires_grad:
            return logits.detach(), None
        target = labels.to(logits.device).long()
        ce = F.cross_entropy(
            logits.float(), target, ignore_index=ignore_index, reduction='sum'
        )
        (grad,) = torch.autograd.grad(ce, x, allow_unused=True)
    return logits.detach(), grad


def check_input_gradients(
    grad: Optional[Tensor], valid_pixels: Optional[Sequence[int]] = None
) -> List[Flag]:
    """``nonfinite_gradients`` (NaN/inf in the input gradient) and
    ``zero_gradients`` (an image's input gradient is exactly zero; ``grad``
    None: the logits do not depend on the input at all).

    Args:
        grad (Tensor, optional): input gradients ``(B, C, H, W)``.
        valid_pixels (sequence of int, optional): per image, the number of
            labelled (not ignored) pixels. An image without any has a zero
            cross-entropy and a zero gradient by construction: it is not
            counted by ``zero_gradients`` (nor attacked in any meaningful way:
            it has no pixel to count). Default: every image counts.
    """
    zero_fix = (
        'attacks need input gradients: keep the input path differentiable (no '
        '.detach(), torch.no_grad(), .numpy() or quantisation of the input inside '
        'the model; use BPDA for non-differentiable preprocessing) and check '
        'that the logits are not saturated (margin-based losses help).'
    )
    if grad is None:
        return [
            Flag(
                'zero_gradients',
                'warning',
                'the logits do not depend on the input through autograd (the '
                'input is detached, or the forward runs under torch.no_grad): '
                'every gradient-based attack sees a zero gradient and the robust '
                'numbers are those of the clean or randomly perturbed images.',
                zero_fix,
                dict(zero_images=None, images=None),
            )
        ]
    flags = []
    g = grad.detach().flatten(1)
    finite = torch.isfinite(g)
    if not bool(finite.all()):
        bad = int((~finite.all(1)).sum())
        flags.append(
            Flag(
                'nonfinite_gradients',
                'warning',
                f'the input gradient of the clean cross-entropy contains NaN/inf '
                f'for {bad} of {g.shape[0]} images: attack steps from them are '
                'undefined.',
                'look for operations with infinite derivatives on the input path '
                '(sqrt/log/division at 0, an exp that overflows); evaluate in fp32.',
                dict(nonfinite_images=bad, images=int(g.shape[0])),
            )
        )
    labelled = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
    if valid_pixels is not None:
        labelled = torch.as_tensor(valid_pixels, device=g.device).reshape(-1) > 0
    zero_grad = torch.where(finite, g, 0).abs().sum(1) == 0
    zero = int((zero_grad & labelled).sum())
    counted = int(labelled.sum())
    if zero:
        unlabelled = g.shape[0] - counted
        flags.append(
            Flag(
                'zero_gradients',
                'warning',
                f'the input gradient of the clean cross-entropy is exactly zero '
                f'for {zero} of {counted} images with labelled pixels (gradient '
                'masking): gradient-based attacks cannot move them.',
                zero_fix,
                dict(
                    zero_images=zero, images=counted, images_without_labels=unlabelled
                ),
            )
        )
    return flags


def _first_names(names, limit: int = 5) -> str:
    """``'a, b, c, d, e and 3 more'``: the first ``limit`` names of a flag."""
    more = f' and {len(names) - limit} more' if len(names) > limit else ''
    return ', '.join(names[:limit]) + more


def check_train_mode(module: torch.nn.Module) -> Optional[Flag]:
    """``train_mode``: modules still in train mode after ``model.eval()``."""
    names = [n or type(m).__name__ for n, m in module.named_modules() if m.training]
    if not names:
        return None
    shown = _first_names(names)
    return Flag(
        'train_mode',
        'warning',
        f'{len(names)} modules are in train mode during the evaluation ({shown}): '
        'dropout is random and BatchNorm uses (and updates) batch statistics, so '
        'predictions depend on the batch and change during the attack.',
        'the loop calls model.eval(); a module whose train()/eval() is overridden '
        'or which sets self.training in forward must leave eval mode alone.',
        dict(modules=names[:20], count=len(names)),
    )


def buffer_snapshot(module: torch.nn.Module) -> Dict[str, Tensor]:
    """Copies of the module's buffers (BatchNorm statistics, ...)."""
    return {n: b.detach().clone() for n, b in module.named_buffers()}


def check_buffers(before: Dict[str, Tensor], module: torch.nn.Module) -> Optional[Flag]:
    """``buffers_changed``: a buffer of ``before`` is not bitwise equal any more
    (buffers created after the snapshot, e.g. lazily at the first forward, are
    not compared)."""
    now = dict(module.named_buffers())
    changed = [
        n
        for n, b in before.items()
        if n not in now
        or now[n].shape != b.shape
        or not torch.equal(now[n].detach(), b.to(now[n].device))
    ]
    if not changed:
        return None
    shown = _first_names(changed)
    return Flag(
        'buffers_changed',
        'warning',
        f'{len(changed)} buffers of the model changed while the first batch was '
        f'checked and attacked ({shown}): the model is not the same function '
        'during the attack (BatchNorm in train mode updates its running '
        'statistics at every forward), so the robust numbers depend on the order '
        'of the images and of the attacks.',
        'keep every module in eval mode during the evaluation (BatchNorm with '
        'track_running_stats uses its stored statistics only in eval mode) and do '
        'not write to buffers in forward.',
        dict(buffers=changed[:20], count=len(changed)),
    )


def check_labels(
    labels: Tensor,
    num_classes: int,
    ignore_index: int,
    keys: Sequence[str],
) -> Optional[Flag]:
    """``labels_out_of_range`` (error): label values outside ``[0, K)`` other
    than ``ignore_index``, naming the images (``keys``: their img_path) and the
    values."""
    bad_images = []
    values = set()
    for key, lab in zip(keys, labels):
        vals = torch.unique(lab)
        bad = vals[(vals != ignore_index) & ((vals < 0) | (vals >= num_classes))]
        if bad.numel():
            bad_images.append(str(key))
            values.update(int(v) for v in bad.tolist())
    if not bad_images:
        return None
    shown = sorted(values)
    return Flag(
        'labels_out_of_range',
        'error',
        f'labels outside [0, {num_classes}) other than ignore_index={ignore_index}: '
        f'values {shown[:20]} in {", ".join(bad_images[:5])}'
        + (f' and {len(bad_images) - 5} more images' if len(bad_images) > 5 else '')
        + ': every metric would be wrong.',
        'make the dataset produce labels in [0, num_classes) or ignore_index: '
        'set reduce_zero_label (0 = "other" in ADE20K-style data), a label_map '
        "in the dataset's metainfo, the decode head's ignore_index, or "
        'num_classes to the number of classes of the dataset.',
        dict(values=shown[:100], images=bad_images[:20], num_classes=num_classes),
    )


def pre_attack_checks(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    ignore_index: int = 255,
    module: Optional[torch.nn.Module] = None,
    logits: Optional[Tensor] = None,
) -> List[Flag]:
    """The checks before the attack, on one (the first) batch: one clean forward
    without gradients (skipped when ``logits`` are given) and one with an
    input-gradient pass.

    Args:
        model (callable): pixel images in [0, 1] -> logits ``(B, K, H, W)`` (a
            :class:`~mmseg_robust.models.SegmentorPixelView`).
        images (Tensor): the clean images ``(B, 3, H, W)``.
        labels (Tensor): their labels ``(B, H, W)``.
        ignore_index (int): the ignored label value.
        module (nn.Module, optional): the model's module, for ``train_mode``.
        logits (Tensor, optional): the clean logits, already computed (the test
            loop's clean prediction).

    Returns:
        list[Flag]: ``nonfinite_logits`` (error; then nothing else is checked),
        ``train_mode``, ``probability_outputs``, ``stochastic_inference``,
        ``nonfinite_gradients``, ``zero_gradients``.
    """
    flags: List[Flag] = []
    if module is not None:
        flag = check_train_mode(module)
        if flag:
            flags.append(flag)
    first = logits
    if first is None:
        with torch.no_grad():
            first = model(images)
    flag = check_finite_logits(first)
    if flag:
        return [flag] + flags
    flag = check_probability_outputs(first)
    if flag:
        flags.append(flag)
    info = check_log_probability_outputs(first)
    if info:
        from mmengine.logging import print_log

        print_log(f'Self-check information: {info}', logger='current')
    second, grad = clean_input_gradient(model, images, labels, ignore_index)
    labelled = (labels != ignore_index).flatten(1).sum(1)
    for flag in [check_stochastic(first, second)] + check_input_gradients(
        grad, labelled
    ):
        if flag:
            flags.append(flag)
    return flags


# -------------------------------------------------------- attacked points
class LogitsWatch:
    """A model view that watches the logits of every forward of an attack
    for NaN/inf (``nonfinite_logits`` at attacked points).

    Calls ``model`` and counts, without a device sync, the forwards whose
    logits are not all finite; :meth:`nonfinite_forwards` reads the count
    (one sync). ``.model`` is the wrapped view's module, so that the attacks'
    eval-mode guard sees it.

    Args:
        model (callable): the model view (pixel images -> logits).
    """

    def __init__(self, model: Callable[[Tensor], Tensor]) -> None:
        self.view = model
        self.model = (
            model
            if isinstance(model, torch.nn.Module)
            else getattr(model, 'model', None)
        )
        self.forwards = 0
        self._bad: Optional[Tensor] = None

    def __call__(self, x: Tensor) -> Tensor:
        logits = self.view(x)
        self.forwards += 1
        bad = (~torch.isfinite(logits.detach())).any().to(torch.int64)
        self._bad = bad if self._bad is None else self._bad + bad
        return logits

    def nonfinite_forwards(self) -> int:
        """The number of forwards with NaN/inf logits."""
        return 0 if self._bad is None else int(self._bad)


def check_attacked_logits(
    nonfinite_forwards: int, forwards: int, attack: str, eps: str, keys: Sequence[str]
) -> Optional[Flag]:
    """``nonfinite_logits`` (error) at attacked points: the logits were NaN or
    inf in ``nonfinite_forwards`` of the ``forwards`` of ``attack`` at ``eps``
    on the batch of the images ``keys``."""
    if not nonfinite_forwards:
        return None
    shown = _first_names([str(k) for k in keys])
    return Flag(
        'nonfinite_logits',
        'error',
        f'the logits were NaN/inf in {nonfinite_forwards} of {forwards} forward '
        f'passes of {attack} at eps {eps} on the batch of {shown}: the model is '
        'undefined at points of the eps-ball the attack evaluated, so a '
        "prediction there (argmax of NaN) is arbitrary, the attack's gradients "
        'are NaN, and the robust numbers of these images would count an '
        "arbitrary prediction as the attack's result.",
        'find the operation that overflows or divides by zero away from the clean '
        'images (log/sqrt of a quantity positive only there, a normalisation '
        'by a variance or norm that can vanish, an exp that overflows) and guard '
        'it (clamp_min, an epsilon); evaluate in fp32.',
        dict(
            nonfinite_forwards=int(nonfinite_forwards),
            forwards=int(forwards),
            attack=attack,
            eps=eps,
            images=[str(k) for k in keys][:20],
        ),
    )


def check_adversarial_images(
    adv: Tensor,
    clean: Tensor,
    radius: float,
    norm: str,
    attack: str,
    eps: str,
    atol: float = 1e-6,
) -> Optional[Flag]:
    """``invalid_adversarial_images`` (error): returned adversarial images that
    are not finite, leave the pixel range ``[0, 1]``, or leave the eps-ball
    around the clean images (L-inf: ``max |adv - x| <= radius``; L2:
    ``||adv - x||_2 <= radius``; ``radius`` in [0, 1] units, both up to
    ``atol`` of float rounding).

    Args:
        adv, clean (Tensor): ``(B, C, H, W)`` adversarial and clean images.
        radius (float): the ball's radius in [0, 1] units (``eps / 255``).
        norm (str): ``'Linf'`` or ``'L2'``.
        attack, eps (str): named in the message.
    """
    a, x = adv.detach().double(), clean.detach().double().to(adv.device)
    b = a.shape[0]
    nonfinite = ~torch.isfinite(a).flatten(1).all(1)
    a0 = torch.where(torch.isfinite(a), a, x)
    out_of_range = ((a0 < -atol) | (a0 > 1 + atol)).flatten(1).any(1)
    delta = (a0 - x).flatten(1)
    dist = delta.abs().amax(1) if norm == 'Linf' else delta.norm(dim=1)
    outside = dist > radius + atol * (1 if norm == 'Linf' else max(1.0, radius))
    bad = nonfinite | out_of_range | outside
    if not bool(bad.any()):
        return None
    counts = dict(
        nonfinite=int(nonfinite.sum()),
        out_of_range=int(out_of_range.sum()),
        outside_ball=int(outside.sum()),
    )
    return Flag(
        'invalid_adversarial_images',
        'error',
        f'{attack} at eps {eps} returned {int(bad.sum())} of {b} images that are '
        f'not valid adversarial images ({counts["nonfinite"]} not finite, '
        f'{counts["out_of_range"]} outside [0, 1], {counts["outside_ball"]} '
        f'outside the {norm} ball of radius {radius:.6g}; largest distance '
        f'{float(dist.max()):.6g}): its robust numbers would be too low.',
        'a custom attack must project onto the eps-ball and clip to [0, 1] '
        '(ThreatModel.project); eps is in /255 units.',
        dict(counts, images=b, attack=attack, eps=eps, max_distance=float(dist.max())),
    )


#: a pixel's class counts as changed between two forwards only when the other
#: forward's logit of that class is below its maximum by more than this share
#: of the image's logit RMS: at adversarial points many pixels sit next to a
#: tie, where float noise (batch composition, kernels) may flip the argmax.
NEAR_TIE_RTOL = 1e-3


def _decisive_changes(pred: Tensor, logits: Tensor) -> Tensor:
    """bool ``(B, H, W)``: pixels where class ``pred`` is not within
    :data:`NEAR_TIE_RTOL` (of the image's logit RMS) of the maximum of
    ``logits``."""
    scale = logits.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1)
    gap = logits.max(1).values - logits.gather(1, pred[:, None].long())[:, 0]
    return gap > NEAR_TIE_RTOL * scale


def _forward_difference(a: Tensor, b: Tensor) -> tuple:
    """Largest per-image relative L2 difference of two logit tensors and the
    share of pixels whose argmax differs decisively (not a near-tie)."""
    a, b = a.detach().float(), b.detach().float()
    diff = (a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-12)
    changed = _decisive_changes(a.argmax(1), b) | _decisive_changes(b.argmax(1), a)
    return float(diff.max()), float(changed.float().mean())


def _gradient_entry_points() -> set:
    """The code of the autograd entry points a forward that optimises calls."""
    return {torch.autograd.backward.__code__, torch.autograd.grad.__code__}


def forward_calls_autograd(model: Callable[[Tensor], Tensor], x: Tensor) -> tuple:
    """Forward ``x`` while watching for calls of ``torch.autograd.backward`` or
    ``torch.autograd.grad`` (``Tensor.backward`` calls the former) inside the
    forward, as AutoAttack's dynamic check does (``sys.setprofile``).

    Returns:
        tuple: ``(logits, called)``.
    """
    import sys

    codes = _gradient_entry_points()
    called = []

    def profile(frame, event, arg):
        if event == 'call' and frame.f_code in codes:
            called.append(frame.f_code.co_name)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        sys.setprofile(previous)
    return logits, sorted(set(called))


def check_dynamic_model(
    first: Tensor,
    second: Tensor,
    autograd_calls: Sequence[str] = (),
    eps: str = '',
    rtol: float = 1e-4,
    pixel_share: float = 1e-3,
) -> Optional[Flag]:
    """``dynamic_model``: two forward passes of the same adversarial batch,
    after its attack, disagree (relative logit difference above ``rtol`` or
    predictions differing on more than ``pixel_share`` of the pixels), or the
    forward computes gradients (``autograd_calls``: it optimises inside
    ``forward``, AutoAttack's dynamic check)."""
    if not (bool(torch.isfinite(first).all()) and bool(torch.isfinite(second).all())):
        return None  # nonfinite_logits speaks for itself
    rel, changed = _forward_difference(first, second)
    calls = list(autograd_calls)
    if rel <= rtol and changed <= pixel_share and not calls:
        return None
    found = []
    if rel > rtol or changed > pixel_share:
        found.append(
            f'two forward passes of the adversarial batch at eps {eps} differ '
            f'(relative logit difference {rel:.2e}, predictions differ on '
            f'{100 * changed:.2f}% of the pixels)'
        )
    if calls:
        found.append(
            f'the forward computes gradients (torch.autograd.{", ".join(calls)} '
            'inside forward)'
        )
    return Flag(
        'dynamic_model',
        'warning',
        '; '.join(found)
        + ': the model changes with its inputs or over time (it optimises or '
        'adapts inside forward, or is random off the clean images), so the '
        'attacks attacked a different function than the one evaluated and the '
        'robust numbers are not those of a fixed model.',
        'evaluate a fixed model: no test-time optimisation, adaptation or '
        'randomness in forward; to evaluate such a defence, attack it adaptively '
        '(e.g. through its optimisation, BPDA/EOT) and report that attack.',
        dict(
            relative_difference=rel,
            changed_pixels=changed,
            autograd_calls=calls,
            eps=eps,
        ),
    )


def check_recorded_prediction(
    recorded: Tensor,
    logits: Tensor,
    valid: Optional[Tensor] = None,
    eps: str = '',
    pixel_share: float = 1e-3,
) -> Optional[Flag]:
    """``prediction_mismatch``: the prediction recomputed at the returned
    adversarial images (``logits.argmax(1)``) differs from the one the attack
    recorded, whose counts are the robust numbers, on more than
    ``pixel_share`` of the (``valid``) pixels; a pixel whose recorded class
    is within a near-tie of the maximum (:data:`NEAR_TIE_RTOL`) agrees."""
    if not bool(torch.isfinite(logits).all()):
        return None  # nonfinite_logits speaks for itself
    logits = logits.detach().float()
    differ = _decisive_changes(recorded.to(logits.device), logits)
    if valid is not None:
        valid = valid.to(logits.device)
        total = int(valid.sum())
        differ = differ & valid
    else:
        total = differ.numel()
    changed = int(differ.sum()) / max(total, 1)
    if changed <= pixel_share:
        return None
    images = int(differ.flatten(1).any(1).sum())
    return Flag(
        'prediction_mismatch',
        'warning',
        f'the prediction recomputed at the adversarial images of eps {eps} differs '
        f'from the recorded one on {100 * changed:.2f}% of the pixels ({images} of '
        f'{logits.shape[0]} images): the robust numbers do not describe the '
        'returned images.',
        'a custom attack must return the prediction at the images it returns; '
        'otherwise the model changes between forwards (see dynamic_model and '
        'stochastic_inference).',
        dict(changed_pixels=changed, images=images, eps=eps),
    )


# ------------------------------------------------------------- final checks
def _accuracy(counts: dict) -> float:
    return pixel_accuracy(counts['correct'], counts['valid'])


def above_clean_counts(records: Sequence[dict]) -> Dict[str, dict]:
    """Per eps, how many images end above their clean pixel accuracy: under each
    attack (information: a random start in the eps-ball can end above clean on
    a robust image) and under the worst case over the attacks (the attacks all
    failed there).

    Args:
        records (sequence of dict): per-image records
            (:func:`~mmseg_robust.evaluation.image_record`; only ``correct`` and
            ``valid`` of the counts are read).

    Returns:
        dict: ``{eps: {'images', 'attacks': {name: n}, 'worst_case': n,
        'worst_case_images': [key, ...]}}`` over the images with labelled
        pixels (``images``), the first 20 keys of the worst case's images.
    """
    out: Dict[str, dict] = OrderedDict()
    for rec in records:
        clean = _accuracy(rec['clean'])
        if not np.isfinite(clean):
            continue
        for eps, attacks in rec['attacks'].items():
            entry = out.setdefault(
                eps,
                dict(
                    images=0,
                    attacks=OrderedDict((n, 0) for n in attacks),
                    worst_case=0,
                    worst_case_images=[],
                ),
            )
            entry['images'] += 1
            accs = {n: _accuracy(c) for n, c in attacks.items()}
            for n, acc in accs.items():
                if acc > clean:
                    entry['attacks'][n] = entry['attacks'].get(n, 0) + 1
            if accs and min(accs.values()) > clean:
                entry['worst_case'] += 1
                if len(entry['worst_case_images']) < 20:
                    entry['worst_case_images'].append(str(rec.get('key')))
    return out


#: ``robust_above_clean`` for a single attack: the largest share of images
#: that may end above clean without a flag (random starts, few iterations).
SINGLE_ATTACK_SHARE = 0.05


def check_robust_above_clean(
    records: Sequence[dict], single_attack_share: float = SINGLE_ATTACK_SHARE
) -> Optional[Flag]:
    """``robust_above_clean``: the worst case over the attacks ends above the
    clean pixel accuracy on some image (every attack failed there), or, where
    a single attack runs at an eps, on more than ``single_attack_share`` of the
    images. One attack of several ending above clean is not flagged (its count
    is information: :func:`above_clean_counts`)."""
    counts = above_clean_counts(records)
    flagged = OrderedDict()
    for eps, v in counts.items():
        if not v['images']:
            continue
        share = v['worst_case'] / v['images']
        single = len(v['attacks']) == 1
        if (single and share > single_attack_share) or (not single and v['worst_case']):
            flagged[eps] = dict(v, share=share, single_attack=single)
    if not flagged:
        return None
    parts = []
    for eps, v in flagged.items():
        names = ', '.join(f'{n} {k}' for n, k in v['attacks'].items())
        what = 'the attack' if v['single_attack'] else 'the worst case'
        parts.append(
            f'eps {eps}: {what} on {v["worst_case"]}/{v["images"]} images '
            f'({100 * v["share"]:.1f}%; each attack: {names}; e.g. '
            f'{", ".join(v["worst_case_images"][:3])})'
        )
    single_note = (
        f' (a single attack: more than {100 * single_attack_share:g}% of the images)'
        if any(v['single_attack'] for v in flagged.values())
        else ''
    )
    return Flag(
        'robust_above_clean',
        'warning',
        'the worst case over the attacks ended above the clean pixel accuracy'
        + single_note
        + ' ('
        + '; '.join(parts)
        + '): the clean image is in the eps-ball and beats every point the '
        'attacks returned, so they failed on these images and the robust '
        'numbers are too high there.',
        'run more iterations (SEA: 300) or more attacks; the worst case above '
        'clean on many images points to gradient masking or a random model (see '
        'the other flags). RobustnessMetric(clean_candidate=True) counts the '
        'clean image in the worst case (docs/algorithms.md section 4).',
        dict(single_attack_share=single_attack_share, eps=flagged),
    )


def check_clean_accuracy(
    summary: dict,
    num_classes: int,
    label_area: Optional[Sequence[int]] = None,
    miou_margin: float = 2.0,
    acc_margin: float = 5.0,
) -> Optional[Flag]:
    """``clean_near_chance``: the clean model is not better than chance.

    Raised when the clean mIoU (percent) is at most that of the best constant
    prediction plus ``miou_margin`` points (with the pooled per-class label
    areas ``label_area``: predicting the most frequent class everywhere gives
    mIoU = its pixel share / the number of classes present; without them the
    bound ``100 / K``), or the pooled clean pixel accuracy is below
    ``100 / K + acc_margin``.
    """
    clean = summary.get('clean') or {}
    miou, aacc = clean.get('mIoU'), clean.get('aAcc')
    if miou is None or aacc is None or num_classes < 2:
        return None
    chance_acc = 100.0 / num_classes
    constant = dict(mIoU=100.0 / num_classes, cls=None, share=None)
    if label_area is not None:
        area = np.asarray(label_area, dtype=np.float64)
        if area.sum() > 0:
            top = int(area.argmax())
            share = 100.0 * area[top] / area.sum()
            constant = dict(mIoU=share / int((area > 0).sum()), cls=top, share=share)
    if not (miou <= constant['mIoU'] + miou_margin or aacc < chance_acc + acc_margin):
        return None
    if constant['cls'] is None:
        what = f'a constant prediction reaches at most {constant["mIoU"]:.2f}% mIoU'
    else:
        what = (
            f'predicting class {constant["cls"]} ({constant["share"]:.1f}% of the '
            f'pixels) everywhere gives {constant["mIoU"]:.2f}% mIoU and '
            f'{constant["share"]:.2f}% pixel accuracy'
        )
    return Flag(
        'clean_near_chance',
        'warning',
        f'the clean model is near chance (mIoU {miou:.2f}%, pixel accuracy '
        f'{aacc:.2f}%; {what}; uniform guessing {chance_acc:.2f}% for '
        f'{num_classes} classes): robust numbers of a model that is not '
        'accurate mean nothing.',
        'check that the checkpoint loads and fits the config, the data '
        "preprocessor's mean/std and channel order, the dataset's classes and "
        'label mapping (reduce_zero_label), and the test pipeline; or train '
        'the model further.',
        dict(
            mIoU=miou,
            aAcc=aacc,
            constant_mIoU=constant['mIoU'],
            constant_class=constant['cls'],
            chance_aAcc=chance_acc,
            num_classes=num_classes,
        ),
    )


#: ``robust_rises_with_eps``: the rise (percentage points) of a worst-case
#: number from a radius to a larger one that is not flagged.
RISE_TOLERANCE = 0.1
#: ``image_accuracy_rises_with_eps``: an image counts when its worst-case pixel
#: accuracy at a larger radius is above that at a smaller one by more than
#: this (percentage points) ...
IMAGE_RISE_TOLERANCE = 1.0
#: ... and the flag is raised when more than this share of the images count.
IMAGE_RISE_SHARE = 0.05


def _sorted_eps(summary: dict) -> List[str]:
    return sorted((summary.get('eps') or {}), key=float)


def check_robust_rises_with_eps(
    summary: dict, tolerance: float = RISE_TOLERANCE
) -> Optional[Flag]:
    """``robust_rises_with_eps``: a worst-case number (mIoU or aACC, percent)
    at a larger radius is above the one at a smaller radius by more than
    ``tolerance`` points. The ball of the larger radius contains the smaller
    one, so the strongest attack can only do better there: a rise means the
    attack at the larger radius is weaker than the one at the smaller."""
    eps = _sorted_eps(summary)
    rises = []
    for i, small in enumerate(eps):
        for large in eps[i + 1 :]:
            a = summary['eps'][small]['worst_case']
            b = summary['eps'][large]['worst_case']
            for key, label in (('mIoU', 'mIoU'), ('aAcc_img', 'aACC')):
                x, y = a.get(key), b.get(key)
                if x is None or y is None or not (np.isfinite(x) and np.isfinite(y)):
                    continue
                if y > x + tolerance:
                    rises.append(
                        dict(
                            metric=label,
                            small=small,
                            large=large,
                            at_small=x,
                            at_large=y,
                        )
                    )
    if not rises:
        return None
    parts = '; '.join(
        f'{r["metric"]} {r["at_small"]:.2f}% at eps {r["small"]} but '
        f'{r["at_large"]:.2f}% at eps {r["large"]}'
        for r in rises
    )
    return Flag(
        'robust_rises_with_eps',
        'warning',
        f'the worst case is higher at a larger radius ({parts}): every point of '
        'the smaller ball is in the larger one, so the attacks at the larger '
        'radius are weaker than those at the smaller and its numbers are too '
        'high.',
        'run more iterations or restarts at the larger radius (SEA: 300 per '
        "attack); for APGD keep the progressive radius schedule (SEA's); a "
        'rise on a model with other flags points to gradient masking.',
        dict(tolerance=tolerance, rises=rises),
    )


def check_image_accuracy_rises_with_eps(
    records: Sequence[dict],
    tolerance: float = IMAGE_RISE_TOLERANCE,
    share: float = IMAGE_RISE_SHARE,
) -> Optional[Flag]:
    """``image_accuracy_rises_with_eps``: more than ``share`` of the images
    have a worst-case pixel accuracy (minimum over the attacks) at a larger
    radius above the one at a smaller radius by more than ``tolerance``
    points: on those images the attack found a worse point in the smaller
    ball than in the larger one, which holds it."""
    if not records:
        return None
    eps = sorted(records[0]['attacks'], key=float)
    found = []
    for i, small in enumerate(eps):
        for large in eps[i + 1 :]:
            images, rising = 0, []
            for rec in records:
                a = [_accuracy(c) for c in rec['attacks'].get(small, {}).values()]
                b = [_accuracy(c) for c in rec['attacks'].get(large, {}).values()]
                if not a or not b or not np.isfinite(min(a)):
                    continue
                images += 1
                if 100.0 * (min(b) - min(a)) > tolerance + 1e-9:
                    rising.append(str(rec.get('key')))
            if images and len(rising) / images > share:
                found.append(
                    dict(
                        small=small,
                        large=large,
                        images=images,
                        rising=len(rising),
                        examples=rising[:5],
                    )
                )
    if not found:
        return None
    parts = '; '.join(
        f'eps {f["small"]} -> {f["large"]}: {f["rising"]}/{f["images"]} images '
        f'(e.g. {", ".join(f["examples"][:3])})'
        for f in found
    )
    return Flag(
        'image_accuracy_rises_with_eps',
        'warning',
        f'on more than {100 * share:g}% of the images the worst-case pixel '
        f'accuracy is more than {tolerance:g} points higher at a larger radius '
        f'({parts}): the attack at the larger radius missed points the smaller '
        'ball holds, so it is weak on these images.',
        'run more iterations or restarts (SEA: 300 per attack) or more attacks '
        'at the larger radius; the images are in the details (their per-image '
        'counts in the results file with tools/test.py --out DIR).',
        dict(tolerance=tolerance, share=share, pairs=found),
    )


#: ``attack_unconverged``: an image counts when its worst-case APGD run gained
#: more than this share of its valid pixels (points) in its last tenth ...
UNCONVERGED_GAIN = 1.0
#: ... and the flag is raised when more than this share of the images count.
UNCONVERGED_SHARE = 0.2


def check_attack_unconverged(
    records: Sequence[dict],
    gain: float = UNCONVERGED_GAIN,
    share: float = UNCONVERGED_SHARE,
) -> Optional[Flag]:
    """``attack_unconverged``: at some eps, on more than ``share`` of the
    images, the attack that gives the image's worst case (the lowest pixel
    accuracy) was an APGD run still improving at its end: its returned point
    lost more than ``gain`` points of pixel accuracy in the last tenth of its
    iterations (``late_gain`` of the records; images whose worst attack has
    none, e.g. PGD, are not counted)."""
    if not records:
        return None
    found = []
    for eps in sorted(records[0]['attacks'], key=float):
        images, late = 0, []
        for rec in records:
            attacks = rec['attacks'].get(eps) or {}
            if not attacks:
                continue
            name = min(attacks, key=lambda n: _accuracy(attacks[n]))
            c = attacks[name]
            if c.get('late_gain') is None or not c['valid']:
                continue
            images += 1
            if 100.0 * c['late_gain'] / c['valid'] > gain + 1e-9:
                late.append(str(rec.get('key')))
        if images and len(late) / images > share:
            found.append(
                dict(eps=eps, images=images, unconverged=len(late), examples=late[:5])
            )
    if not found:
        return None
    parts = '; '.join(
        f'eps {f["eps"]}: {f["unconverged"]}/{f["images"]} images '
        f'(e.g. {", ".join(f["examples"][:3])})'
        for f in found
    )
    return Flag(
        'attack_unconverged',
        'warning',
        f'on more than {100 * share:g}% of the images the attack that gives the '
        f'worst case was still improving at its end (more than {gain:g} points '
        f'of pixel accuracy gained in the last tenth of its iterations: {parts}): '
        'more iterations would lower the robust numbers, which are therefore '
        'too high.',
        'run more iterations (SEA: 300 per attack; evaluator.steps=...); with '
        "the paper's budget and this flag, report the numbers as an upper "
        'bound.',
        dict(gain=gain, share=share, eps=found),
    )


def final_checks(records: Sequence[dict], summary: dict) -> List[Flag]:
    """The checks on all images at the end: ``clean_near_chance``,
    ``robust_above_clean``, ``robust_rises_with_eps`` and
    ``image_accuracy_rises_with_eps``."""
    if not records:
        return []
    areas = [r['clean'].get('label_area') for r in records]
    label_area = (
        np.sum([np.asarray(a, dtype=np.int64) for a in areas], axis=0)
        if all(a is not None for a in areas)
        else None
    )
    flags = [
        check_clean_accuracy(summary, int(records[0]['num_classes']), label_area),
        check_robust_above_clean(records),
        check_robust_rises_with_eps(summary),
        check_image_accuracy_rises_with_eps(records),
        check_attack_unconverged(records),
    ]
    return [f for f in flags if f]
