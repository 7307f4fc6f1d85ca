"""FGSM, BIM and PGD in pixel space (docs/algorithms.md section 3.1)."""

from typing import Callable, List, Optional, Union

import torch
from torch import Tensor

from mmseg_robust.registry import ATTACKS

from .base import (
    Attack,
    AttackOutput,
    SegmentationTarget,
    batch_stats,
    bcast,
    better_iterate,
    input_gradient,
    output_at,
    resolve_steps,
)
from .objectives import Objective
from .seg_logits import SegLogits

__all__ = ['BIM', 'FGSM', 'PGD']

LossConfig = Union[str, dict, Objective]


@ATTACKS.register_module()
class PGD(Attack):
    """Projected Gradient Descent (Madry et al., ICLR 2018) for semantic
    segmentation, maximising a per-pixel objective (docs/algorithms.md section 3.1).

    Threat model: L-inf (default) or L2 ball of radius ``eps/255`` in pixel space,
    clipped to ``[0, 1]``. Update ``x <- Proj(x + alpha * sign(grad))`` (L-inf) or
    ``x <- Proj(x + alpha * grad / ||grad||_2)`` per image (L2).

    Args:
        eps (float): radius in /255 units. Default: 8.
        norm (str): ``'Linf'`` or ``'L2'``. Default: ``'Linf'``.
        steps (int): number of gradient steps (``n_iter`` is accepted as an
            alias). Default: 10.
        step_size (float, optional): ``alpha`` in /255 units. Default:
            ``2.5 * eps / steps``.
        random_start (bool): start uniformly in the ball (clipped) instead of at
            the clean image. Default: True.
        loss (str | dict | Objective): objective (section 2), e.g. ``'CE'``,
            ``'Mask-CE'`` or ``dict(type='Mask-CE-Bal', class_weights='voc')``.
            Default: ``'CE'``.
        best_iterate (bool): return the iterate with the lowest per-image pixel
            accuracy (ties: the newer one, except that an image keeps its first
            accuracy-0 iterate) instead of the final iterate. Default: False.
        ignore_index (int): label value that never counts. Default: 255.
        eps_units (str, optional): ``'255'`` confirms that ``eps`` is in /255
            units: no unit warnings (:func:`~mmseg_robust.attacks.check_eps`).
            Default: None (checked).
        name (str, optional): name of the results (see :class:`Attack`).
            Default: ``'<class>-<objective>'``, e.g. ``'PGD-CE'``.
        predict_output (bool): spend one forward (no backward) on the returned
            images for ``adv_pred`` and the ``final_*`` statistics. With False
            (and without ``best_iterate``, which needs that forward to choose)
            ``adv_pred`` is None and the statistics hold ``last_loss``/
            ``last_acc`` instead of ``final_*``: those of the last iterate the
            attack evaluated, the input of its last step (the clean images or
            the random start when ``steps=1``). Adversarial training uses
            False: the forward would only feed its log. Default: True.

    Shapes: images ``(B, 3, H, W)`` in ``[0, 1]``, labels long ``(B, H, W)``,
    valid bool ``(B, H, W)``; ``model(images)`` returns logits ``(B, K, H, W)``.
    Cost: ``steps`` forward+backward passes and one forward (none with
    ``predict_output=False``).

    Example:
        >>> attack = PGD(eps=8, norm='Linf', steps=10)
        >>> adv_images = attack(model, images, labels)
    """

    def __init__(
        self,
        eps: float = 8,
        norm: str = 'Linf',
        steps: Optional[int] = None,
        step_size: Optional[float] = None,
        random_start: bool = True,
        loss: LossConfig = 'CE',
        best_iterate: bool = False,
        ignore_index: int = 255,
        n_iter: Optional[int] = None,
        eps_units: Optional[str] = None,
        name: Optional[str] = None,
        predict_output: bool = True,
    ) -> None:
        super().__init__(eps, norm, ignore_index, eps_units, name)
        self.steps = resolve_steps(steps, n_iter, 10, type(self).__name__)
        if step_size is None:
            step_size = 2.5 * self.eps / self.steps
        if float(step_size) < 0:
            raise ValueError(f'step_size must be >= 0 (/255 units), got {step_size}')
        self.step_size = float(step_size)
        self.random_start = bool(random_start)
        self.best_iterate = bool(best_iterate)
        self.predict_output = bool(predict_output)
        self.objective = self._build_objective(loss)

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(eps={self.eps:g}, norm={self.norm!r}, '
            f'steps={self.steps}, step_size={self.step_size:g}, '
            f'random_start={self.random_start}, loss={self.objective!r}, '
            f'best_iterate={self.best_iterate})'
        )

    def objectives(self) -> List[Objective]:
        return [self.objective]

    def _attack(
        self,
        target: SegmentationTarget,
        x: Tensor,
        seeds: Optional[List[int]],
        report: Callable[[str], None],
    ) -> AttackOutput:
        tm = self.threat_model
        alpha = self.step_size / 255.0
        if self.random_start:
            x_adv = tm.random_start(x, seeds=seeds)
        else:
            x_adv = x.clone()
        best = None
        stats = {}
        for t in range(1, self.steps + 1):
            x_adv.requires_grad_(True)
            s = target.evaluate(x_adv, step=t, total_steps=self.steps)
            grad = input_gradient(self.objective.from_logits(s).sum(), x_adv)
            x_adv = x_adv.detach()
            if t == 1:
                stats.update(batch_stats(s, 'start'))
            if t == self.steps and not (self.predict_output or self.best_iterate):
                stats.update(batch_stats(s, 'last'))
            if self.best_iterate:
                best = _keep_best(best, x_adv, s)
            del s  # free the logits before the next forward
            with torch.no_grad():
                x_adv = tm.project(x_adv + alpha * tm.direction(grad), x)
        if not (self.predict_output or self.best_iterate):
            return AttackOutput(x_adv, None, stats)
        # The final iterate still needs its prediction: one forward, no backward.
        with torch.no_grad():
            s = target.evaluate(x_adv, step=self.steps + 1, total_steps=self.steps)
        if not self.best_iterate:
            stats.update(batch_stats(s, 'final'))
            return AttackOutput(x_adv, s.pred, stats)
        best = _keep_best(best, x_adv, s)
        return output_at(target, best[1], stats)


def _keep_best(best, x_adv: Tensor, s: SegLogits):
    """Update ``(n_correct, images)`` of the lowest-accuracy iterate."""
    n_correct = s.num_correct
    if best is None:
        return n_correct, x_adv
    upd = better_iterate(n_correct, best[0])
    return (
        torch.where(upd, n_correct, best[0]),
        torch.where(bcast(upd, x_adv), x_adv, best[1]),
    )


@ATTACKS.register_module()
class BIM(PGD):
    """Basic Iterative Method (Kurakin et al., ICLR 2017 workshop): PGD without
    random start (docs/algorithms.md section 3.1).

    Threat model: L-inf (default) or L2 ball of radius ``eps/255`` in pixel space,
    clipped to ``[0, 1]``.

    Args:
        eps (float): radius in /255 units. Default: 8.
        norm (str): ``'Linf'`` or ``'L2'``. Default: ``'Linf'``.
        steps (int): number of steps (alias ``n_iter``). Default: 10.
        step_size (float, optional): step in /255 units. Default:
            ``2.5 * eps / steps``.
        loss (str | dict | Objective): objective (section 2). Default: ``'CE'``.
        best_iterate (bool): return the lowest-accuracy iterate. Default: False.
        ignore_index (int): label value that never counts. Default: 255.
        eps_units (str, optional): ``'255'`` confirms that ``eps`` is in /255
            units: no unit warnings (:func:`~mmseg_robust.attacks.check_eps`).
            Default: None (checked).
        name (str, optional): name of the results (see :class:`Attack`).
            Default: ``'<class>-<objective>'``.
        predict_output (bool): as :class:`PGD`. Default: True.

    Shapes: as :class:`PGD`.

    Example:
        >>> attack = BIM(eps=7.65, steps=3, step_size=2.55)  # SAT's training attack
        >>> adv_images = attack(model, images, labels)
    """

    def __init__(
        self,
        eps: float = 8,
        norm: str = 'Linf',
        steps: Optional[int] = None,
        step_size: Optional[float] = None,
        loss: LossConfig = 'CE',
        best_iterate: bool = False,
        ignore_index: int = 255,
        n_iter: Optional[int] = None,
        eps_units: Optional[str] = None,
        name: Optional[str] = None,
        predict_output: bool = True,
    ) -> None:
        super().__init__(
            eps=eps,
            norm=norm,
            steps=steps,
            step_size=step_size,
            random_start=False,
            loss=loss,
            best_iterate=best_iterate,
            ignore_index=ignore_index,
            n_iter=n_iter,
            eps_units=eps_units,
            name=name,
            predict_output=predict_output,
        )


@ATTACKS.register_module()
class FGSM(PGD):
    """Fast Gradient Sign Method (Goodfellow et al., ICLR 2015): one step of size
    ``eps`` from the clean image (docs/algorithms.md section 3.1); with ``norm='L2'``
    the fast gradient method (one normalised-gradient step of length ``eps``).

    Threat model: L-inf (default) or L2 ball of radius ``eps/255`` in pixel space,
    clipped to ``[0, 1]``.

    Args:
        eps (float): radius and step in /255 units. Default: 8.
        norm (str): ``'Linf'`` or ``'L2'``. Default: ``'Linf'``.
        loss (str | dict | Objective): objective (section 2). Default: ``'CE'``.
        ignore_index (int): label value that never counts. Default: 255.
        eps_units (str, optional): ``'255'`` confirms that ``eps`` is in /255
            units: no unit warnings (:func:`~mmseg_robust.attacks.check_eps`).
            Default: None (checked).
        name (str, optional): name of the results (see :class:`Attack`).
            Default: ``'<class>-<objective>'``.
        predict_output (bool): as :class:`PGD` (without the forward,
            ``last_*`` are the statistics of the clean images). Default: True.

    Shapes: as :class:`PGD`.

    Example:
        >>> attack = FGSM(eps=8)
        >>> adv_images = attack(model, images, labels)
    """

    def __init__(
        self,
        eps: float = 8,
        norm: str = 'Linf',
        loss: LossConfig = 'CE',
        ignore_index: int = 255,
        eps_units: Optional[str] = None,
        name: Optional[str] = None,
        predict_output: bool = True,
    ) -> None:
        super().__init__(
            eps=eps,
            norm=norm,
            steps=1,
            step_size=eps,
            random_start=False,
            loss=loss,
            best_iterate=False,
            ignore_index=ignore_index,
            eps_units=eps_units,
            name=name,
            predict_output=predict_output,
        )
