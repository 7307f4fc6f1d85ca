"""Minimal-norm segmentation attacks of adv-lib (Rony et al.) behind the attack
API (docs/algorithms.md section 3.5): ALMA prox, DAG and PDPGD.

A minimal-norm attack does not maximise a loss in a fixed ball: it looks for
the smallest perturbation that makes a fraction ``adv_threshold`` of an
image's valid pixels wrong. :meth:`MinimalNormAttack.minimal` returns that
perturbation per image with its radius (the norm of the perturbation, /255
units) and the pixels it flips, and :meth:`MinimalNormOutput.robust_accuracy`
turns the radii into a robust pixel accuracy against eps. As an attack at a
radius eps (:meth:`Attack.run`, the robustness evaluation), an image gets its
minimal-norm point where that lies in the eps-ball, else its clean image.

adv-lib is an optional dependency: ``pip install 'mmseg_robust[adv-lib]'``.
"""

import contextlib
import importlib
import inspect
import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from mmseg_robust.registry import ATTACKS

from .base import Attack, AttackOutput, SegmentationTarget, batch_stats, resolve_steps
from .seg_logits import SegLogits

__all__ = [
    'ALMAProx',
    'DAG',
    'MinimalNormAttack',
    'MinimalNormOutput',
    'PDPGD',
    'import_adv_lib',
]

_INSTALL = "pip install 'mmseg_robust[adv-lib]'"


def import_adv_lib():
    """``adv_lib.attacks.segmentation``, or an ImportError that says how to
    install it."""
    try:
        return importlib.import_module('adv_lib.attacks.segmentation')
    except ImportError as e:
        raise ImportError(
            f'the minimal-norm attacks ALMAProx, DAG and PDPGD run the '
            f'implementations of adv-lib, which is not installed ({e}); install '
            f'it with {_INSTALL}'
        ) from e


class MinimalNormOutput(NamedTuple):
    """Result of :meth:`MinimalNormAttack.minimal`, per image.

    Attributes:
        adv_images (Tensor): ``(B, 3, H, W)`` in ``[0, 1]``: the point the
            attack returned (adv-lib's smallest adversarial perturbation, or,
            where it found none, its point with the most wrong pixels).
        radius (Tensor): float ``(B,)``, the norm of ``adv_images - images``
            in the attack's norm, in /255 units.
        success (Tensor): bool ``(B,)``, at least ``adv_threshold`` of the
            image's valid pixels are wrong at ``adv_images``.
        flipped (Tensor): bool ``(B, H, W)``, the valid pixels predicted
            correctly at the clean image and wrongly at ``adv_images``.
        adv_pred (Tensor): long ``(B, H, W)``, the prediction at
            ``adv_images``.
        clean_correct, adv_correct, valid (Tensor): long ``(B,)``, correct
            valid pixels at the clean and at the returned images, and valid
            pixels.
        stats (dict): the pass counts (``passes``, ``forwards``, long
            ``(B,)``, docs/algorithms.md section 3.6).
    """

    adv_images: Tensor
    radius: Tensor
    success: Tensor
    flipped: Tensor
    adv_pred: Tensor
    clean_correct: Tensor
    adv_correct: Tensor
    valid: Tensor
    stats: dict

    def correct_at(self, eps: float) -> Tensor:
        """Per image the correct valid pixels of the worst point known to lie
        in the eps-ball (``eps`` in /255 units): the lower of the clean and
        the returned image's where ``radius <= eps``, the clean image's
        elsewhere."""
        inside = self.radius <= float(eps)
        return torch.where(
            inside,
            torch.minimum(self.adv_correct, self.clean_correct),
            self.clean_correct,
        )

    def robust_accuracy(self, eps: Union[float, Sequence[float]]) -> Dict[float, float]:
        """Robust pixel accuracy against eps: ``{eps: accuracy}``, the correct
        valid pixels of :meth:`correct_at` over all valid pixels of the batch
        (pooled, a fraction in [0, 1]; NaN without valid pixels). An upper
        bound of the true robust accuracy, as every attack gives."""
        eps_list = [eps] if isinstance(eps, (int, float)) else list(eps)
        total = int(self.valid.sum())
        return {
            float(e): (int(self.correct_at(e).sum()) / total if total else math.nan)
            for e in eps_list
        }


class MinimalNormAttack(Attack):
    """Base class of the adv-lib minimal-norm attacks (docs/algorithms.md
    section 3.5); subclasses name the adv-lib function and its arguments.

    Args:
        eps (float): radius in /255 units at which :meth:`run` reports: an
            image gets its minimal-norm point where ``radius <= eps``, else
            its clean image. Default: 8.
        norm (str): ``'Linf'`` or ``'L2'``. Default: ``'Linf'``.
        steps (int, optional): iterations of the adv-lib attack (alias
            ``n_iter``). Default: the subclass's.
        adv_threshold (float): fraction of an image's valid pixels that must
            be wrong for the image to count as adversarial (adv-lib's
            ``adv_threshold``). Default: 0.99.
        options (dict, optional): further keyword arguments of the adv-lib
            function (e.g. ``dict(lr_init=0.001)`` for ALMA prox).
        ignore_index (int): label value that never counts. Default: 255.
        eps_units (str, optional): ``'255'`` confirms /255 units.
        name (str, optional): name of the results. Default: the class name.

    The attacks are deterministic (no random start; ``seeds`` are unused).
    """

    #: name of the function in ``adv_lib.attacks.segmentation``
    function = ''
    #: adv-lib's name of the iteration count
    steps_argument = 'num_steps'
    default_steps = 500
    norms = ('Linf', 'L2')

    def __init__(
        self,
        eps: float = 8,
        norm: str = 'Linf',
        steps: Optional[int] = None,
        adv_threshold: float = 0.99,
        options: Optional[dict] = None,
        ignore_index: int = 255,
        n_iter: Optional[int] = None,
        eps_units: Optional[str] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(eps, norm, ignore_index, eps_units, name)
        owner = type(self).__name__
        if self.norm not in self.norms:
            raise ValueError(
                f'{owner} is an attack in the {" or ".join(self.norms)} norm, got '
                f'norm={self.norm!r}'
            )
        self.steps = resolve_steps(steps, n_iter, self.default_steps, owner)
        if not 0 < float(adv_threshold) <= 1:
            raise ValueError(
                f'{owner}: adv_threshold must be in (0, 1], got {adv_threshold!r}'
            )
        self.adv_threshold = float(adv_threshold)
        self.options = dict(options or {})

    def default_name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(eps={self.eps:g}, norm={self.norm!r}, '
            f'steps={self.steps}, adv_threshold={self.adv_threshold:g}, '
            f'options={self.options!r}{self._extra_repr()})'
        )

    def _extra_repr(self) -> str:
        """The subclass's own settings in :meth:`__repr__` (the result cache's
        fingerprint holds the repr)."""
        return ''

    # ------------------------------------------------------------- adv-lib call
    def _arguments(self) -> dict:
        """The adv-lib keyword arguments of this attack (subclasses add theirs)."""
        return {self.steps_argument: self.steps, 'adv_threshold': self.adv_threshold}

    def _function(self) -> Callable:
        fn = getattr(import_adv_lib(), self.function)
        known = inspect.signature(fn).parameters
        unknown = sorted(set(self.options) - set(known))
        if unknown:
            takes = [p for p in known if p not in ('model', 'inputs', 'labels')]
            raise ValueError(
                f'{type(self).__name__}: options {unknown} are not arguments of '
                f'adv_lib.attacks.segmentation.{self.function} (it takes '
                f'{", ".join(takes)})'
            )
        return fn

    def _context(self):
        return contextlib.nullcontext()

    def _call(self, fn, target: SegmentationTarget, x: Tensor) -> Tensor:
        """adv-lib's attack on the images of ``target``: its returned points."""
        expected = x.shape[0]

        def model(images: Tensor) -> Tensor:
            if images.shape[0] != expected:
                raise RuntimeError(
                    f'adv_lib.attacks.segmentation.{self.function} forwarded '
                    f'{images.shape[0]} of {expected} images: this adv-lib '
                    'version changes the batch in a way the pass accounting does '
                    'not follow; use adv-lib 0.2.8'
                )
            return target.forward(images)

        kwargs = dict(self._arguments(), **self.options)
        with self._context():
            adv = fn(model, x, target.labels, masks=target.valid, **kwargs)
        return adv.detach()

    def _run_adv_lib(self, target: SegmentationTarget, x: Tensor) -> Tensor:
        return self._call(self._function(), target, x)

    # -------------------------------------------------------------- public API
    def minimal(
        self,
        model,
        images: Tensor,
        labels: Tensor,
        valid: Optional[Tensor] = None,
        seeds: Optional[Sequence[int]] = None,
    ) -> MinimalNormOutput:
        """The minimal-norm points of a batch, their radii and flipped pixels
        (:class:`MinimalNormOutput`); arguments as :meth:`Attack.run`."""
        from .base import eval_mode

        x, target, _ = self._prepare(model, images, labels, valid, seeds)
        with eval_mode(model), torch.enable_grad():
            before = target.counter.snapshot(None)
            found = self._minimal(target, x)[0]
            spent = target.counter.spent(before, target.counter.snapshot(None))
        return found._replace(
            adv_images=found.adv_images.to(images.dtype),
            stats={k: v.detach() for k, v in spent.items()},
        )

    def _minimal(self, target: SegmentationTarget, x: Tensor):
        """The :class:`MinimalNormOutput` (without stats) and the
        :class:`SegLogits` of the clean and of the returned images."""
        with torch.no_grad():
            clean = target.evaluate(x)
        adv = self._run_adv_lib(target, x).clamp(0.0, 1.0)
        with torch.no_grad():
            s = target.evaluate(adv)
            delta = (adv - x).flatten(1)
            if self.norm == 'Linf':
                radius = delta.abs().amax(dim=1)
            else:
                radius = delta.norm(p=2, dim=1)
            n_valid = target.valid.sum(dim=(1, 2))
            wrong = ~s.correct & target.valid
            success = wrong.sum(dim=(1, 2)) >= self.adv_threshold * n_valid
            out = MinimalNormOutput(
                adv_images=adv,
                radius=radius * 255.0,
                success=success,
                flipped=wrong & clean.correct,
                adv_pred=s.pred,
                clean_correct=clean.num_correct,
                adv_correct=s.num_correct,
                valid=n_valid,
                stats={},
            )
        return out, clean, s

    def _attack(
        self,
        target: SegmentationTarget,
        x: Tensor,
        seeds: Optional[List[int]],
        report: Callable[[str], None],
    ) -> AttackOutput:
        report(f'adv-lib {self.function}, {self.steps} iterations')
        found, clean, s = self._minimal(target, x)
        with torch.no_grad():
            # the minimal-norm point where it lies in the ball, else the clean image
            inside = found.radius <= self.eps
            pick = inside.view(-1, 1, 1, 1)
            points = torch.where(pick, found.adv_images, x)
            chosen = SegLogits(
                torch.where(pick, s.logits, clean.logits),
                target.labels,
                target.valid,
                all_valid=target.all_valid,
            )
            stats = dict(
                batch_stats(clean, 'start'),
                **batch_stats(chosen, 'final'),
                radius=found.radius,
                success=found.success,
            )
        return AttackOutput(points, chosen.pred, stats)


@ATTACKS.register_module()
class ALMAProx(MinimalNormAttack):
    """ALMA prox (Rony, Pesquet & Ben Ayed, "Proximal Splitting Adversarial
    Attacks for Semantic Segmentation", CVPR 2023), the L-inf minimal-norm
    attack of adv-lib (``adv_lib.attacks.segmentation.alma_prox``;
    docs/algorithms.md section 3.5).

    Args:
        compile (bool): run adv-lib's ``torch.compile``-d proximal operator
            compiled (its first call compiles, tens of seconds on a CPU);
            False runs it eagerly (same numbers up to float rounding).
            Default: True.
        Others: as :class:`MinimalNormAttack` (L-inf only; ``steps``
            default 500, one forward+backward pass each).

    Example:
        >>> attack = ALMAProx(eps=8, steps=500)
        >>> found = attack.minimal(model, images, labels)
        >>> found.radius, found.robust_accuracy([1, 2, 4, 8])
    """

    function = 'alma_prox'
    norms = ('Linf',)

    def __init__(self, *args, compile: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compile = bool(compile)

    def _extra_repr(self) -> str:
        return f', compile={self.compile}'

    def _context(self):
        if self.compile:
            return contextlib.nullcontext()
        return torch.compiler.set_stance('force_eager')


@ATTACKS.register_module()
class PDPGD(MinimalNormAttack):
    """Primal-dual proximal gradient descent (Matyasko & Chau, "PDPGD:
    Primal-Dual Proximal Gradient Descent Adversarial Attack", 2021) adapted to
    segmentation by adv-lib (``adv_lib.attacks.segmentation.pdpgd``;
    docs/algorithms.md section 3.5), in the L-inf or L2 norm.

    Args: as :class:`MinimalNormAttack` (``steps`` default 500, one
    forward+backward pass each).

    Example:
        >>> found = PDPGD(norm='L2', steps=500).minimal(model, images, labels)
    """

    function = 'pdpgd'

    def _arguments(self) -> dict:
        return dict(super()._arguments(), norm=_P[self.norm])


@ATTACKS.register_module()
class DAG(MinimalNormAttack):
    """Dense Adversary Generation (Xie et al., "Adversarial Examples for
    Semantic Segmentation and Object Detection", ICCV 2017) as implemented by
    adv-lib (``adv_lib.attacks.segmentation.dag``; docs/algorithms.md section
    3.5): steps of length ``gamma`` along the gradient normalised in the
    attack's norm until ``adv_threshold`` of the pixels are wrong; an image
    where that never happens keeps its clean image (radius 0).

    Each image is attacked on its own (adv-lib drops finished images from the
    batch), so the pass counts stay per image.

    Args:
        gamma (float): step length (adv-lib's ``γ``). Default: 0.5 (adv-lib's).
        Others: as :class:`MinimalNormAttack` (``steps`` default 200; an image
            stops at its first adversarial iterate).

    Example:
        >>> found = DAG(steps=200, gamma=0.01).minimal(model, images, labels)
    """

    function = 'dag'
    steps_argument = 'max_iter'
    default_steps = 200

    def __init__(self, *args, gamma: float = 0.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not float(gamma) > 0:
            raise ValueError(f'DAG gamma must be > 0, got {gamma!r}')
        self.gamma = float(gamma)

    def _extra_repr(self) -> str:
        return f', gamma={self.gamma:g}'

    def _arguments(self) -> dict:
        return dict(super()._arguments(), p=_P[self.norm], **{'γ': self.gamma})

    def _run_adv_lib(self, target: SegmentationTarget, x: Tensor) -> Tensor:
        fn = self._function()
        return torch.cat(
            [
                self._call(
                    fn, target.subset(torch.tensor([i], device=x.device)), x[i : i + 1]
                )
                for i in range(x.shape[0])
            ]
        )


_P = {'Linf': float('inf'), 'L2': 2}
