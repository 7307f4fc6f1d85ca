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
- after the first batch's attack: ``buffers_changed``
  (:func:`buffer_snapshot`, :func:`check_buffers`), ``train_mode``;
- at the end, on all images (:func:`final_checks`): ``clean_near_chance``,
  ``robust_above_clean``.

:class:`~mmseg_robust.engine.AdversarialTestLoop` runs them (``self_checks=True``,
the default), logs every flag once, raises :class:`SelfCheckError` (a
``ValueError``) for errors before attacking, and hands the flags to
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

__all__ = [
    'FLAGS_DOC',
    'FLAG_CODES',
    'Flag',
    'SelfCheckError',
    'buffer_snapshot',
    'check_buffers',
    'check_clean_accuracy',
    'check_finite_logits',
    'check_input_gradients',
    'check_labels',
    'check_log_probability_outputs',
    'check_probability_outputs',
    'check_robust_above_clean',
    'check_stochastic',
    'check_train_mode',
    'clean_input_gradient',
    'final_checks',
    'flag_from_json',
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


def flag_from_json(data: dict) -> Flag:
    """A :class:`Flag` from its :meth:`Flag.to_json` dict."""
    return Flag(
        code=str(data['code']),
        level=str(data.get('level', 'warning')),
        message=str(data.get('message', '')),
        fix=str(data.get('fix', '')),
        details=dict(data.get('details') or {}),
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


def check_input_gradients(grad: Optional[Tensor]) -> List[Flag]:
    """``nonfinite_gradients`` (NaN/inf in the input gradient) and
    ``zero_gradients`` (an image's input gradient is exactly zero; ``grad``
    None: the logits do not depend on the input at all)."""
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
    zero = int((torch.where(finite, g, 0).abs().sum(1) == 0).sum())
    if zero:
        flags.append(
            Flag(
                'zero_gradients',
                'warning',
                f'the input gradient of the clean cross-entropy is exactly zero '
                f'for {zero} of {g.shape[0]} images (gradient masking): '
                'gradient-based attacks cannot move them.',
                zero_fix,
                dict(zero_images=zero, images=int(g.shape[0])),
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
    for flag in [check_stochastic(first, second)] + check_input_gradients(grad):
        if flag:
            flags.append(flag)
    return flags


# ------------------------------------------------------------- final checks
def _accuracy(counts: dict) -> float:
    return counts['correct'] / counts['valid'] if counts['valid'] else float('nan')


def check_robust_above_clean(records: Sequence[dict]) -> Optional[Flag]:
    """``robust_above_clean``: per image, an attack's pixel accuracy is above
    the clean one (the attack returned a point the clean image beats)."""
    per_eps = OrderedDict()
    total = 0
    for rec in records:
        clean = _accuracy(rec['clean'])
        if not np.isfinite(clean):
            continue
        total += 1
        for eps, attacks in rec['attacks'].items():
            above = [n for n, c in attacks.items() if _accuracy(c) > clean]
            entry = per_eps.setdefault(eps, dict(images=0, worst_case=0, attacks={}))
            if above:
                entry['images'] += 1
                if len(above) == len(attacks):
                    entry['worst_case'] += 1
                for n in above:
                    entry['attacks'][n] = entry['attacks'].get(n, 0) + 1
    per_eps = OrderedDict((e, v) for e, v in per_eps.items() if v['images'])
    if not per_eps:
        return None
    parts = []
    for eps, v in per_eps.items():
        names = ', '.join(f'{n} {k}' for n, k in v['attacks'].items())
        parts.append(
            f'eps {eps}: {v["images"]}/{total} images '
            f'({100 * v["images"] / total:.1f}%; {names}; worst case '
            f'{v["worst_case"]})'
        )
    return Flag(
        'robust_above_clean',
        'warning',
        'attacks ended above the clean pixel accuracy on some images ('
        + '; '.join(parts)
        + '): the attacks return their best iterate, which need not beat the '
        'clean image after a random start, so they did not work on these '
        'images and the robust numbers of the attacks concerned are too high.',
        'run more iterations (SEA: 300) or more attacks; an attack ending above '
        'clean on many images points to gradient masking (see the other flags).',
        dict(images=total, eps=per_eps),
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


def final_checks(records: Sequence[dict], summary: dict) -> List[Flag]:
    """The checks on all images at the end: ``clean_near_chance`` and
    ``robust_above_clean``."""
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
    ]
    return [f for f in flags if f]
