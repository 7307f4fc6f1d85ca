"""Square Attack: a query-based, gradient-free attack (docs/algorithms.md
section 3.7), the gradient-free probe of the self-checks (docs/flags.md)."""

import math
from typing import Callable, List, Optional

import torch
from torch import Tensor

from mmseg_robust.registry import ATTACKS

from .base import Attack, AttackOutput, SegmentationTarget, batch_stats
from .seg_logits import SegLogits
from .threat_model import make_generators

__all__ = ['Square', 'square_fraction']


def square_fraction(p_init: float, it: int, n_queries: int) -> float:
    """The fraction of pixels of the square at query ``it`` (Andriushchenko et
    al., ECCV 2020, App. C): ``p_init`` halved at iterations 10, 50, 200, 500,
    1000, 2000, 4000, 6000, 8000 of a 10,000-query budget, rescaled to
    ``n_queries``."""
    it = int(it / n_queries * 10000)
    halvings = sum(it > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2**halvings


def _margin_loss(s: SegLogits) -> Tensor:
    """Per image: the mean over valid pixels of ``relu(z_y - max_{k != y}
    z_k)``, the positive margins of the correctly classified pixels (zero once
    every pixel is flipped). The attack lowers it."""
    z = s.logits
    z_y = z.gather(1, s.labels.unsqueeze(1)).squeeze(1)
    other = z.scatter(1, s.labels.unsqueeze(1), float('-inf')).amax(1)
    margin = torch.relu(z_y - other)
    return s.reduce(margin)


@ATTACKS.register_module()
class Square(Attack):
    """Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020) for
    semantic segmentation, L-inf: random search over square patches.

    It needs no gradient: each query changes one square window of the
    perturbation to ``+-eps`` per colour channel (at a random place; the side
    shrinks over the queries, :func:`square_fraction`) and keeps the change for
    an image if it lowers the image's objective: the pixel accuracy first, then
    the mean positive margin ``relu(z_y - max_{k != y} z_k)`` over the valid
    pixels (docs/algorithms.md section 3.7). It starts from vertical stripes of
    ``+-eps``. One forward per query, no backward: robustness it finds where
    gradient attacks do not points to gradient masking (the self-checks'
    gradient-free probe, docs/flags.md).

    Args:
        eps (float): L-inf radius in /255 units. Default: 8.
        queries (int): forward passes per image after the first (0: the
            stripes it starts from). Default: 300.
        p_init (float): initial fraction of the image the square covers.
            Default: 0.05 (the paper's L-inf value for a 1,000-query budget
            is 0.05 to 0.3; segmentation images are large).
        ignore_index (int): label value that never counts. Default: 255.
        eps_units (str, optional): ``'255'`` confirms /255 units.
        name (str, optional): name of the results. Default: ``'Square'``.

    Example:
        >>> attack = ATTACKS.build(dict(type='Square', eps=8, queries=300))
        >>> adv_images = attack(model, images, labels, seeds=[0, 1])
    """

    def __init__(
        self,
        eps: float = 8,
        queries: int = 300,
        p_init: float = 0.05,
        norm: str = 'Linf',
        ignore_index: int = 255,
        eps_units: Optional[str] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(eps, norm, ignore_index, eps_units, name)
        if self.norm != 'Linf':
            raise ValueError(
                f'Square implements the L-inf threat model only, got norm={norm!r}; '
                'use a gradient attack (APGD) for L2'
            )
        if int(queries) != queries or queries < 0:
            raise ValueError(f'queries must be an int >= 0, got {queries!r}')
        if not 0 < p_init <= 1:
            raise ValueError(f'p_init must be in (0, 1], got {p_init!r}')
        self.queries = int(queries)
        self.steps = self.queries
        self.p_init = float(p_init)

    def default_name(self) -> str:
        return 'Square'

    def __repr__(self) -> str:
        return (
            f'Square(eps={self.eps:g}, norm={self.norm!r}, queries={self.queries}, '
            f'p_init={self.p_init:g})'
        )

    @staticmethod
    def _score(s: SegLogits):
        """(correct pixels, margin loss) per image: lower is better."""
        return s.num_correct, _margin_loss(s).detach()

    def _attack(
        self,
        target: SegmentationTarget,
        x: Tensor,
        seeds: Optional[List[int]],
        report: Callable[[str], None],
    ) -> AttackOutput:
        eps = self.threat_model.radius
        b, c, h, w = x.shape
        gens = make_generators(
            seeds if seeds is not None else list(range(b))
        )  # per-image draws: independent of the batch
        signs = torch.stack(
            [torch.randint(0, 2, (c, 1, w), generator=g).float() * 2 - 1 for g in gens]
        ).to(x)
        delta = eps * signs.expand(b, c, h, w).clone()
        x_best = (x + delta).clamp(0, 1)
        with torch.no_grad():
            s = target.evaluate(x_best)
            stats = batch_stats(s, 'start')
            best_correct, best_margin = self._score(s)
        del s
        for it in range(self.queries):
            side = max(
                1,
                min(
                    round(
                        math.sqrt(
                            square_fraction(self.p_init, it, self.queries) * h * w
                        )
                    ),
                    h,
                    w,
                ),
            )
            cand_delta = (x_best - x).clone()
            for i, g in enumerate(gens):
                top = int(torch.randint(0, h - side + 1, (1,), generator=g))
                left = int(torch.randint(0, w - side + 1, (1,), generator=g))
                window = cand_delta[i, :, top : top + side, left : left + side]
                for _ in range(10):  # a new value in at least one channel
                    new = eps * (
                        torch.randint(0, 2, (c, 1, 1), generator=g).float() * 2 - 1
                    )
                    new = new.to(x)
                    if not torch.all((window - new).abs() < 1e-7):
                        break
                cand_delta[i, :, top : top + side, left : left + side] = new
            cand = (x + cand_delta).clamp(0, 1)
            with torch.no_grad():
                s = target.evaluate(cand)
                correct, margin = self._score(s)
            del s
            better = (correct < best_correct) | (
                (correct == best_correct) & (margin < best_margin)
            )
            x_best = torch.where(better.view(-1, 1, 1, 1), cand, x_best)
            best_correct = torch.where(better, correct, best_correct)
            best_margin = torch.where(better, margin, best_margin)
            if (it + 1) % 100 == 0:
                report(f'Square query {it + 1}/{self.queries}')
        with torch.no_grad():
            s = target.evaluate(x_best)
            stats.update(batch_stats(s, 'final'))
            return AttackOutput(x_best, s.pred, stats)
