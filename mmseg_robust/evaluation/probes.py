"""Opt-in probes of the attack outcome (docs/flags.md): two cheap extra attacks
whose result a reliable evaluation predicts, run on the first attacked batch.

- :func:`large_radius_probe`: APGD with the cross-entropy at several times the
  largest evaluated radius must drive the pixel accuracy near 0 (at 32/255 no
  model of the SEA paper keeps accuracy, Croce et al. ECCV 2024, App. C.3);
  where it does not, the gradients do not lead the attack anywhere: gradient
  masking (``large_radius_probe``).
- :func:`gradient_free_probe`: the Square Attack (queries only, no gradient)
  must not beat the white-box worst case; where it does, the white-box attacks
  were misled by the gradients (``gradient_free_probe``).

Both are functions on a model view (``images -> logits``) and plain tensors;
:class:`~mmseg_robust.evaluation.RobustnessEvaluator` runs them when asked
(``probes=``).
"""

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mmseg_robust.attacks.seg_logits import effective_valid, num_correct

from .counts import pixel_accuracy
from .self_checks import Flag

__all__ = [
    'PROBES',
    'gradient_free_probe',
    'large_radius_probe',
    'probe_settings',
]

#: probe name -> its default settings.
PROBES = dict(
    large_radius=dict(factor=4.0, steps=20, max_accuracy=5.0),
    gradient_free=dict(images=4, queries=300, tolerance=2.0),
)


def probe_settings(probes) -> dict:
    """``{name: settings}`` from ``probes``: None/False (none), True (both),
    a name, a list of names, or ``{name: {setting: value}}`` (settings not
    given keep :data:`PROBES`' defaults)."""
    if probes is None or probes is False:
        return {}
    if probes is True:
        probes = list(PROBES)
    if isinstance(probes, str):
        probes = [p.strip() for p in probes.split(',') if p.strip()]
    if not isinstance(probes, dict):
        probes = {p: {} for p in probes}
    out = {}
    for name, given in probes.items():
        if name not in PROBES:
            raise ValueError(
                f'unknown probe {name!r}; choose from {sorted(PROBES)} (docs/flags.md)'
            )
        given = dict(given or {})
        unknown = sorted(set(given) - set(PROBES[name]))
        if unknown:
            raise ValueError(
                f'probe {name} has no setting(s) {unknown}; its settings are '
                f'{sorted(PROBES[name])}'
            )
        out[name] = dict(PROBES[name], **given)
    return out


def _accuracies(pred: Tensor, labels: Tensor, valid, ignore_index: int) -> Tensor:
    """Per image pixel accuracy in percent (NaN without valid pixels), the
    evaluation's one per-image accuracy (:func:`~mmseg_robust.evaluation.
    pixel_accuracy`)."""
    mask = effective_valid(labels, valid, ignore_index)
    acc = pixel_accuracy(num_correct(pred, labels, mask), mask.sum(dim=(1, 2)))
    return 100.0 * torch.as_tensor(acc, dtype=torch.float64).reshape(-1)


def large_radius_probe(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    valid: Optional[Tensor],
    seeds: Sequence[int],
    eps: float,
    factor: float = 4.0,
    steps: int = 20,
    max_accuracy: float = 5.0,
    norm: str = 'Linf',
    ignore_index: int = 255,
) -> Tuple[Optional[Flag], dict]:
    """APGD-CE at ``factor * eps`` (in /255) for ``steps`` iterations.

    Returns:
        (Flag or None, details): ``large_radius_probe`` when the mean pixel
        accuracy over the images (percent) it leaves is above
        ``max_accuracy``; the details hold the radius and the per-image
        accuracies.
    """
    from mmseg_robust.attacks import APGD

    radius = float(factor) * float(eps)
    attack = APGD(
        eps=radius,
        norm=norm,
        steps=int(steps),
        loss='CE',
        ignore_index=ignore_index,
        eps_units='255',
        name='large-radius probe',
    )
    out = attack.run(model, images, labels, valid, seeds=list(seeds))
    acc = _accuracies(out.adv_pred, labels, valid, ignore_index)
    kept = acc[~torch.isnan(acc)]
    mean = float(kept.mean()) if kept.numel() else float('nan')
    details = dict(
        eps=float(eps),
        radius=radius,
        norm=norm,
        steps=int(steps),
        max_accuracy=float(max_accuracy),
        mean_accuracy=mean,
        accuracies=[round(float(a), 2) for a in acc],
    )
    if not kept.numel() or mean <= max_accuracy:
        return None, details
    return (
        Flag(
            'large_radius_probe',
            'warning',
            f'APGD-CE at {radius:g}/255 ({factor:g} x the largest eps, {steps} '
            f'iterations) leaves {mean:.1f}% pixel accuracy on the first '
            f'attacked batch ({kept.numel()} images; expected at most '
            f'{max_accuracy:g}%): at a radius this large the gradients should '
            'lead anywhere, so they do not lead the attacks: gradient masking, '
            'and the robust numbers overestimate robustness.',
            'look for what hides the gradients (non-differentiable '
            'preprocessing, saturated softmax outputs, randomness, detached '
            'paths); see the other flags; evaluate with a gradient-free attack '
            '(probes=gradient_free) or with BPDA/EOT where the model needs it.',
            details,
        ),
        details,
    )


def gradient_free_probe(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    valid: Optional[Tensor],
    seeds: Sequence[int],
    eps: float,
    white_box: Sequence[float],
    keys: Sequence[str],
    queries: int = 300,
    tolerance: float = 2.0,
    ignore_index: int = 255,
) -> Tuple[Optional[Flag], dict]:
    """The Square Attack (L-inf, ``queries`` forwards) at ``eps`` against the
    white-box worst case ``white_box`` (per image pixel accuracy, percent).

    Returns:
        (Flag or None, details): ``gradient_free_probe`` when the Square
        Attack's pixel accuracy is more than ``tolerance`` points below the
        white-box worst case on some image.
    """
    from mmseg_robust.attacks import Square

    attack = Square(
        eps=eps, queries=int(queries), ignore_index=ignore_index, eps_units='255'
    )
    out = attack.run(model, images, labels, valid, seeds=list(seeds))
    acc = _accuracies(out.adv_pred, labels, valid, ignore_index)
    beaten: List[dict] = []
    for key, sq, wb in zip(keys, acc.tolist(), white_box):
        if sq == sq and wb == wb and sq < wb - tolerance:  # NaN-safe
            beaten.append(
                dict(image=str(key), square=round(sq, 2), white_box=round(wb, 2))
            )
    details = dict(
        eps=float(eps),
        queries=int(queries),
        tolerance=float(tolerance),
        square=[round(float(a), 2) for a in acc],
        white_box=[round(float(a), 2) for a in white_box],
        beaten=beaten,
    )
    if not beaten:
        return None, details
    worst = max(beaten, key=lambda b: b['white_box'] - b['square'])
    return (
        Flag(
            'gradient_free_probe',
            'warning',
            f'the Square Attack (no gradients, {queries} queries) at eps {eps:g} '
            f'beats the white-box worst case by more than {tolerance:g} points '
            f'of pixel accuracy on {len(beaten)}/{len(keys)} probed images '
            f'(e.g. {worst["image"]}: {worst["square"]:.2f}% against '
            f'{worst["white_box"]:.2f}%): the gradient attacks were misled by '
            'the gradients there (gradient masking), so the robust numbers '
            'are too high.',
            'look for what masks the gradients (see large_radius_probe and '
            'the other flags); report the Square Attack with the white-box '
            'numbers, or adapt the attack to the model (BPDA, EOT).',
            details,
        ),
        details,
    )
