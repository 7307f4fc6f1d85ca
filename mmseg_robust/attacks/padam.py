"""PAdam: projected Adam steps in pixel space (docs/algorithms.md section 3.4)."""

from typing import Callable, List, Optional, Union

import torch
from torch import Tensor

from mmseg_robust.registry import ATTACKS

from .base import (
    Attack,
    AttackOutput,
    SegmentationTarget,
    batch_stats,
    input_gradient,
    output_at,
    resolve_steps,
)
from .objectives import Objective
from .pgd import _keep_best

__all__ = ['PAdam']

LossConfig = Union[str, dict, Objective]


@ATTACKS.register_module()
class PAdam(Attack):
    """Projected Adam (Halmosi et al., ECCV 2024): the perturbation ``delta``
    follows Adam with AMSGrad (``torch.optim.Adam(amsgrad=True,
    maximize=True)``) on the gradient of the objective itself, not its sign,
    and is projected onto the ball and the pixel range after every step
    (docs/algorithms.md section 3.4).

    Threat model: L-inf (default) or L2 ball of radius ``eps/255`` in pixel space,
    clipped to ``[0, 1]``. Adam's moments are per coordinate, so every image
    is optimised independently of its batch. Returns per image the iterate
    with the lowest pixel accuracy, as :class:`PGD` with ``best_iterate``
    (ties: the newer one, except that an image keeps its first accuracy-0
    iterate).

    Args:
        eps (float): radius in /255 units. Default: 8.
        norm (str): ``'Linf'`` or ``'L2'``. Default: ``'Linf'``.
        steps (int): Adam steps (alias ``n_iter``). Default: 100.
        lr (float): Adam's learning rate in /255 units. Default: 2 (the paper's
            2/255).
        betas (tuple of float): Adam's ``(beta1, beta2)``. Default:
            ``(0.9, 0.999)`` (torch's).
        random_start (bool): start uniformly in the ball (clipped) instead of at
            the clean image. Default: True.
        loss (str | dict | Objective): objective (section 2), e.g. ``'CE'`` or
            ``'CosPGD'``. Default: ``'CE'``.
        ignore_index (int): label value that never counts. Default: 255.
        eps_units (str, optional): ``'255'`` confirms that ``eps`` is in /255
            units: no unit warnings (:func:`~mmseg_robust.attacks.check_eps`).
            Default: None (checked).
        name (str, optional): name of the results (see :class:`Attack`).
            Default: ``'PAdam-<objective>'``.

    Shapes: images ``(B, 3, H, W)`` in ``[0, 1]``, labels long ``(B, H, W)``,
    valid bool ``(B, H, W)``; ``model(images)`` returns logits ``(B, K, H, W)``.
    Cost: ``steps`` forward+backward passes and one forward per image.

    Example:
        >>> attack = PAdam(eps=8, steps=100, loss='CE')
        >>> adv_images = attack(model, images, labels)
    """

    def __init__(
        self,
        eps: float = 8,
        norm: str = 'Linf',
        steps: Optional[int] = None,
        lr: float = 2.0,
        betas=(0.9, 0.999),
        random_start: bool = True,
        loss: LossConfig = 'CE',
        ignore_index: int = 255,
        n_iter: Optional[int] = None,
        eps_units: Optional[str] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(eps, norm, ignore_index, eps_units, name)
        self.steps = resolve_steps(steps, n_iter, 100, type(self).__name__)
        if not float(lr) > 0:
            raise ValueError(f'PAdam lr must be > 0 (/255 units), got {lr!r}')
        self.lr = float(lr)
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f'PAdam betas must be two numbers in [0, 1), got {betas}')
        self.betas = betas
        self.random_start = bool(random_start)
        self.objective = self._build_objective(loss)

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(eps={self.eps:g}, norm={self.norm!r}, '
            f'steps={self.steps}, lr={self.lr:g}, betas={self.betas}, '
            f'random_start={self.random_start}, loss={self.objective!r})'
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
        with torch.no_grad():
            point = tm.random_start(x, seeds=seeds) if self.random_start else x
            delta = point - x  # Adam's parameter
        adam = torch.optim.Adam(
            [delta],
            lr=self.lr / 255.0,
            betas=self.betas,
            amsgrad=True,
            maximize=True,
            foreach=False,  # one code path on every device
        )
        best, stats = None, {}
        for t in range(1, self.steps + 1):
            x_adv = point.clone().requires_grad_(True)
            s = target.evaluate(x_adv, step=t, total_steps=self.steps)
            delta.grad = input_gradient(self.objective.from_logits(s).sum(), x_adv)
            if t == 1:
                stats.update(batch_stats(s, 'start'))
            best = _keep_best(best, point, s)
            del s  # free the logits before the next forward
            adam.step()
            with torch.no_grad():
                # the iterate is the projected point; delta follows it
                point = tm.project(x + delta, x)
                delta.copy_(point - x)
        # the last iterate's prediction: one forward, no backward
        with torch.no_grad():
            s = target.evaluate(point, step=self.steps + 1, total_steps=self.steps)
        best = _keep_best(best, point, s)
        return output_at(target, best[1], stats)
