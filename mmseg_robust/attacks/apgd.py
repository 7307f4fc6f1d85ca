"""APGD (Croce & Hein, ICML 2020) for segmentation and SEA's progressive radius
schedule (docs/algorithms.md sections 3.2 and 3.3).

The pure helpers :func:`apgd_checkpoints`, :func:`step_size_halving` and
:func:`radius_schedule` and the :class:`APGDStepSizeControl` state machine carry the
schedule logic, so it can be tested without a model; :func:`apgd_run` is the
optimiser loop shared by :class:`APGD` and :class:`APGDLargeEps`.
"""

import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from mmseg_robust.registry import ATTACKS

from .base import (
    Attack,
    AttackOutput,
    PassCounter,
    SegmentationTarget,
    batch_stats,
    bcast,
    better_iterate,
    input_gradient,
    output_at,
    resolve_steps,
)
from .objectives import Objective
from .seg_logits import image_miou
from .threat_model import ThreatModel

__all__ = [
    'DEFAULT_MODES',
    'MIOU_CANDIDATE_SUFFIX',
    'APGDModes',
    'FIRST_WINDOW_MODES',
    'STALL_HALVINGS',
    'ZERO_ACC_MODES',
    'APGD',
    'APGDLargeEps',
    'APGDStepSizeControl',
    'apgd_checkpoints',
    'apgd_run',
    'radius_schedule',
    'resolve_modes',
    'stall_patience',
    'step_size_halving',
]

LossConfig = Union[str, dict, Objective]
_MOMENTUM = 0.75  # APGD's momentum a (section 3.2)

#: ``zero_acc``: what happens to an image once its pixel accuracy is 0.
#: ``'leave'``: it keeps its first accuracy-0 iterate (and, with ``early_stop``,
#: leaves the batch); ``'reference'``: it is optimised on and the newest
#: accuracy-0 iterate is returned, as in the SEA reference code.
ZERO_ACC_MODES = ('leave', 'reference')
#: ``first_window``: how condition (a) counts the first step of a run.
#: ``'paper'``: an increase iff ``CE(x_1) > CE(x_0)``; ``'reference'``: an
#: increase iff ``CE(x_1) > 0`` (the reference compares with a row of zeros).
FIRST_WINDOW_MODES = ('paper', 'reference')
#: What ``compat=None`` (or ``'default'``) and ``compat='reference'`` select.
#: The default takes the reference's first-window count but keeps ``zero_acc=
#: 'leave'``: with the reference's accuracy-0 handling a run stops when every
#: image of the *batch* is at accuracy 0, so the attack on an image depends on
#: its batch: 1 and N processes, or a resumed and an uninterrupted run, would
#: run different attacks; and neither variant was stronger in benchmarks/
#: compare_apgd_modes.py ('leave' weaker in 4 of 24 runs, stronger in 5;
#: docs/algorithms.md section 3.2).
DEFAULT_MODES = dict(zero_acc='leave', first_window='reference')
#: ``stall_stop``: an image's step size counts as collapsed once it has been
#: halved this many times (``eta <= 2 r / 2**STALL_HALVINGS``).
STALL_HALVINGS = 3
#: Appended to an attack's name to record its mIoU candidate (section 4.2).
MIOU_CANDIDATE_SUFFIX = ':mIoU-iterate'
_COMPAT = {
    None: DEFAULT_MODES,
    'default': DEFAULT_MODES,
    'reference': dict(zero_acc='reference', first_window='reference'),
}


class APGDModes(NamedTuple):
    """The validated mode options of an APGD-based attack (see
    :func:`resolve_modes`)."""

    compat: Optional[str]
    zero_acc: str
    first_window: str
    stall_stop: bool


def resolve_modes(
    compat: Optional[str] = None,
    zero_acc: Optional[str] = None,
    first_window: Optional[str] = None,
    stall_stop: bool = False,
    owner: str = 'APGD',
) -> APGDModes:
    """The mode options of an APGD-based attack, checked: the one place where
    :class:`APGD`, :class:`APGDLargeEps`, :class:`~mmseg_robust.attacks.SEA`,
    :func:`apgd_run` and :class:`APGDStepSizeControl` validate them.

    ``compat`` (``None``/``'default'`` or ``'reference'``) gives the values of the
    options left as None; an explicit value that contradicts
    ``compat='reference'`` is an error (the result would not be the
    reference's). ``stall_stop`` needs ``zero_acc='leave'``.

    Example:
        >>> resolve_modes('reference')
        APGDModes(compat='reference', zero_acc='reference', first_window='reference', stall_stop=False)
    """  # noqa: E501
    if compat not in _COMPAT:
        raise ValueError(
            f"{owner}: compat must be None, 'default' or 'reference', got {compat!r}"
        )
    modes = dict(_COMPAT[compat])
    for name, value, allowed in (
        ('zero_acc', zero_acc, ZERO_ACC_MODES),
        ('first_window', first_window, FIRST_WINDOW_MODES),
    ):
        if value is None:
            continue
        if value not in allowed:
            raise ValueError(f'{owner}: {name} must be one of {allowed}, got {value!r}')
        if compat == 'reference' and value != modes[name]:
            raise ValueError(
                f"{owner}: compat='reference' sets {name}='reference', got "
                f'{name}={value!r}; drop one of the two'
            )
        modes[name] = value
    if stall_stop and modes['zero_acc'] != 'leave':
        raise ValueError(
            f"{owner}: stall_stop needs zero_acc='leave' (with 'reference' an "
            "image's result already depends on its batch)"
        )
    both = modes['zero_acc'] == modes['first_window'] == 'reference'
    return APGDModes(
        'reference' if both else None,
        modes['zero_acc'],
        modes['first_window'],
        bool(stall_stop),
    )


# --------------------------------------------------------------------------------
# schedule helpers (section 3.2)
# --------------------------------------------------------------------------------
def _apgd_windows(n_iter: int) -> Tuple[List[int], List[int]]:
    """Checkpoint iterations and the length of the window that ends at each."""
    first = max(int(0.22 * n_iter), 1)
    decrement = max(int(0.03 * n_iter), 1)
    minimum = max(int(0.06 * n_iter), 1)
    checks, windows = [], []
    window, i = first, first - 1
    while i < n_iter:
        checks.append(i)
        windows.append(window)
        window = max(window - decrement, minimum)
        i += window
    return checks, windows


def apgd_checkpoints(n_iter: int) -> List[int]:
    """Iterations (0-based, the update that produced ``x_{i+1}``) after which
    APGD checks its step size (section 3.2).

    First window ``p1 = max(int(0.22 n), 1)``; each next window is
    ``max(previous - max(int(0.03 n), 1), max(int(0.06 n), 1))``.

    Example:
        >>> apgd_checkpoints(90)
        [18, 35, 50, 63, 74, 83]
    """
    return _apgd_windows(n_iter)[0]


def stall_patience(n_iter: int) -> int:
    """Iterations without improvement after which ``stall_stop`` lets an image
    with a collapsed step size leave an APGD run of ``n_iter`` iterations: the
    first (longest) window ``max(int(0.22 n), 1)`` (section 3.2).

    Example:
        >>> stall_patience(120)
        26
    """
    return max(int(0.22 * n_iter), 1)


def step_size_halving(
    n_increases: Tensor,
    window: int,
    best_ce: Tensor,
    best_ce_at_last_check: Tensor,
    halved_at_last_check: Tensor,
    rho: float = 0.75,
) -> Tensor:
    """Which images halve their step size at a checkpoint (section 3.2).

    Args:
        n_increases (Tensor): per image, how many of the ``window`` iterations
            since the last checkpoint increased CE over the previous iterate.
        window (int): iterations since the last checkpoint.
        best_ce (Tensor): highest per-image CE so far.
        best_ce_at_last_check (Tensor): highest CE at the previous checkpoint (the
            initial CE at the first one).
        halved_at_last_check (Tensor): bool, whether the step was halved at the
            previous checkpoint (True before the first one, as in the reference,
            so condition (b) cannot fire at the first checkpoint).
        rho (float): fraction of increases required. Default: 0.75.

    Returns:
        Tensor: bool, (a) ``n_increases <= rho * window`` or (b) not halved at the
        previous checkpoint and the best CE did not improve since.
    """
    cond_a = n_increases.to(best_ce.dtype) <= rho * window
    cond_b = ~halved_at_last_check & (best_ce <= best_ce_at_last_check)
    return cond_a | cond_b


class APGDStepSizeControl:
    """Per-image step-size control of one APGD run (section 3.2).

    Tracks plain per-image CE (not the attack objective): the number of CE
    increases in the current window, the best CE and the state of the previous
    checkpoint. :meth:`update` is called once per iteration with the CE of the new
    iterate and says which images improved their best CE (the optimiser then keeps
    that iterate and its gradient as ``x_best``) and, at a checkpoint, which images
    halve their step (they restart from ``x_best``).

    Condition (a) counts, in each window, the steps whose CE is above the CE of the
    iterate before. ``first_window`` says how the very first step of the run
    (``x_0 -> x_1``) is counted:

    - ``'paper'``: like every other step, an increase iff ``CE(x_1) > CE(x_0)``
      (the consecutive-iterate count of the APGD paper);
    - ``'reference'``: an increase iff ``CE(x_1) > 0``, i.e. practically always
      (the SEA reference and AutoAttack code compare ``CE(x_1)`` with a row of
      zeros). When ``CE(x_1) <= CE(x_0)`` the first window then counts one
      increase more than in ``'paper'`` mode, which can avoid a halving by
      condition (a) at the first checkpoint. Later windows are the same.

    Args:
        n_iter (int): iterations of the run.
        ce0 (Tensor): per-image CE at the starting point ``x_0``, ``(B,)``.
        eta0 (float): initial step size in ``[0, 1]`` units (``2 * radius``).
        rho (float): condition (a) threshold. Default: 0.75.
        first_window (str, optional): ``'paper'`` or ``'reference'``, see
            above. Default: ``DEFAULT_MODES['first_window']`` (``'reference'``,
            the default of every attack).

    Example:
        >>> ctl = APGDStepSizeControl(90, ce0, eta0=2 * 8 / 255)
        >>> improved, halved = ctl.update(0, ce1)  # halved is None off checkpoints
    """

    def __init__(
        self,
        n_iter: int,
        ce0: Tensor,
        eta0: float,
        rho: float = 0.75,
        first_window: Optional[str] = None,
    ) -> None:
        first_window = resolve_modes(
            first_window=first_window, owner=type(self).__name__
        ).first_window
        checks, windows = _apgd_windows(n_iter)
        self._windows = dict(zip(checks, windows))
        self.rho = rho
        self.eta = torch.full_like(ce0, eta0)
        # the CE the next iterate is compared with, for condition (a)
        self.ce_prev = ce0 if first_window == 'paper' else torch.zeros_like(ce0)
        self.ce_best = ce0
        self.ce_best_at_last_check = ce0
        self.n_increases = torch.zeros_like(ce0)
        self.halved_at_last_check = torch.ones_like(ce0, dtype=torch.bool)

    def update(self, i: int, ce: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Record the CE of ``x_{i+1}``; return ``(improved, halved or None)``."""
        self.n_increases = self.n_increases + (ce > self.ce_prev).to(ce.dtype)
        self.ce_prev = ce
        improved = ce > self.ce_best
        self.ce_best = torch.where(improved, ce, self.ce_best)
        window = self._windows.get(i)
        if window is None:
            return improved, None
        halved = step_size_halving(
            self.n_increases,
            window,
            self.ce_best,
            self.ce_best_at_last_check,
            self.halved_at_last_check,
            self.rho,
        )
        self.eta = torch.where(halved, 0.5 * self.eta, self.eta)
        self.halved_at_last_check = halved
        self.ce_best_at_last_check = self.ce_best
        self.n_increases = torch.zeros_like(self.n_increases)
        return improved, halved

    def select(self, keep: Tensor) -> None:
        """Keep the images of the bool mask ``keep`` (early stop)."""
        for name in (
            'eta',
            'ce_prev',
            'ce_best',
            'ce_best_at_last_check',
            'n_increases',
            'halved_at_last_check',
        ):
            setattr(self, name, getattr(self, name)[keep])


def radius_schedule(
    n_iter: int,
    eps: float,
    radius_factors: Sequence[float] = (2.0, 1.5, 1.0),
    iter_fractions: Sequence[float] = (0.3, 0.3),
) -> List[Tuple[int, float]]:
    """Stages ``[(n_i, eps_i)]`` of the progressive radius reduction (section 3.3).

    Every stage but the last gets ``int(fraction * n_iter)`` iterations, the last
    the rest; radii are ``factor * eps`` (same units as ``eps``).

    Example:
        >>> radius_schedule(300, 8)
        [(90, 16.0), (90, 12.0), (120, 8.0)]
    """
    if len(iter_fractions) != len(radius_factors) - 1:
        raise ValueError(
            f'need one iteration fraction per stage but the last: got '
            f'{len(radius_factors)} radius factors and {len(iter_fractions)} '
            f'fractions'
        )
    if float(radius_factors[-1]) != 1.0:
        raise ValueError(
            f'the last radius factor must be 1 so that the output lies in the '
            f'eps-ball, got {radius_factors[-1]}'
        )
    if any(f < 0 for f in iter_fractions) or sum(iter_fractions) > 1:
        raise ValueError(
            f'iter_fractions must be >= 0 and sum to <= 1, got {tuple(iter_fractions)}'
        )
    sizes = [int(f * n_iter) for f in iter_fractions]
    sizes.append(n_iter - sum(sizes))
    return [(n, float(f) * eps) for n, f in zip(sizes, radius_factors)]


# --------------------------------------------------------------------------------
# the optimiser loop (section 3.2)
# --------------------------------------------------------------------------------
def _evaluate(
    target: SegmentationTarget,
    objective: Objective,
    x_adv: Tensor,
    step: int,
    total_steps: int,
    need_grad: bool,
    stats: Optional[dict] = None,
    need_pred: bool = False,
):
    """Forward at ``x_adv`` (and backward when ``need_grad``).

    Returns ``(grad or None, per-image CE, correct-pixel counts, prediction or
    None)``, the prediction with ``need_pred``; the logits are dropped here so
    they are freed before the next forward. With ``stats`` (a dict), the
    batch's ``start_*`` statistics are added to it.
    """
    if need_grad:
        x_adv.requires_grad_(True)
        s = target.evaluate(x_adv, step, total_steps)
        grad = input_gradient(objective.from_logits(s).sum(), x_adv)
        x_adv.requires_grad_(False)
    else:
        grad = None
        with torch.no_grad():
            s = target.evaluate(x_adv, step, total_steps)
    if stats is not None:
        stats.update(batch_stats(s, 'start'))
    with torch.no_grad():
        return grad, s.image_ce, s.num_correct, s.pred if need_pred else None


def apgd_run(
    target: SegmentationTarget,
    objective: Objective,
    tm: ThreatModel,
    x: Tensor,
    x0: Tensor,
    radius: float,
    n_iter: int,
    rho: float = 0.75,
    early_stop: bool = True,
    predict_output: bool = True,
    stats: Optional[dict] = None,
    zero_acc: Optional[str] = None,
    first_window: Optional[str] = None,
    stall_stop: bool = False,
    miou_candidate: bool = False,
) -> AttackOutput:
    """One APGD run of ``n_iter`` iterations at ``radius`` (section 3.2).

    Args:
        target (SegmentationTarget): model view, labels and valid mask.
        objective (Objective): the attack objective (gives the gradient).
        tm (ThreatModel): norm of the ball.
        x (Tensor): clean images ``(B, 3, H, W)`` in ``[0, 1]``.
        x0 (Tensor): starting point, already in the ball and in ``[0, 1]``.
        radius (float): radius in ``[0, 1]`` units.
        n_iter (int): iterations; ``n_iter + 1`` forwards, ``n_iter`` backwards.
        rho (float): step-size condition (a) threshold. Default: 0.75.
        early_stop (bool): skip work. With ``zero_acc='leave'``: an image whose
            accuracy reached 0 leaves the batch (its returned point can no
            longer change, so the result is the same). With
            ``zero_acc='reference'``: the run ends when every image of the batch
            has reached accuracy 0, tested after each update, so a run makes at
            least one update even when the whole batch starts at accuracy 0
            (as the reference; the result of an image then depends on the other
            images of its batch). Default: True.
        predict_output (bool): spend one forward on the prediction (and the
            ``final_*`` statistics) at the returned point; without it
            ``adv_pred`` is None (the intermediate stages of
            :class:`APGDLargeEps` need only the point). Default: True.
        stats (dict, optional): ``start_*`` statistics of an earlier stage; else
            they are taken at this run's first iterate.
        zero_acc (str, optional): ``'leave'``: an image keeps its first
            accuracy-0 iterate; ``'reference'``: it keeps being optimised and
            the newest accuracy-0 iterate is returned. Default:
            ``DEFAULT_MODES['zero_acc']`` (``'leave'``), as the attacks.
        first_window (str, optional): count of the first step by condition
            (a), see :class:`APGDStepSizeControl`. Default:
            ``DEFAULT_MODES['first_window']`` (``'reference'``), as the
            attacks.
        stall_stop (bool): an image whose step size has collapsed (halved at
            least :data:`STALL_HALVINGS` times) and whose best CE and lowest
            pixel accuracy have not improved for :func:`stall_patience`
            iterations leaves the run with its returned point so far. Per image,
            so its result does not depend on its batch; needs
            ``zero_acc='leave'``. Default: False.
        miou_candidate (bool): also keep, per image, the iterate with the
            lowest :func:`~mmseg_robust.attacks.seg_logits.image_miou` (ties:
            the newer one; section 4.2), returned as
            ``stats['miou_candidate']``, an :class:`AttackOutput` with the
            prediction evaluated at that iterate: no pass more, one argmax
            per iteration. Default: False.

    Returns:
        AttackOutput: per image the iterate with the lowest pixel accuracy (ties:
        the newer one; at accuracy 0 the first one with ``zero_acc='leave'``)
        and its prediction.
    """
    modes = resolve_modes(None, zero_acc, first_window, stall_stop, 'apgd_run')
    zero_acc, first_window, stall_stop = (
        modes.zero_acc,
        modes.first_window,
        modes.stall_stop,
    )
    leave = zero_acc == 'leave'
    out_x = x0.detach().clone()
    start = None if stats is not None else {}
    grad, ce, n_correct, pred = _evaluate(
        target, objective, out_x.clone(), 1, n_iter, n_iter > 0, start, miou_candidate
    )
    stats = dict(stats if start is None else start)
    cand = None
    if miou_candidate:
        # the mIoU candidate (section 4.2): per image the iterate of lowest
        # image_miou and its prediction; active images' in cand, every
        # image's in out_cand (written when an image leaves and at the end)
        with torch.no_grad():
            score = image_miou(pred, target.labels, target.valid, target.num_classes)
        cand = [out_x.clone(), pred, score]
        out_cand = [t.clone() for t in cand]

    def finish(points: Tensor) -> AttackOutput:
        if cand is not None:
            stats['miou_candidate'] = AttackOutput(out_cand[0], out_cand[1], {})
        if predict_output:
            return output_at(target, points, stats)
        return AttackOutput(points, None, stats)

    if n_iter == 0:
        return finish(out_x)
    if cand is not None:
        cand[0] = out_x.clone()  # the run's own copy: out_x is written below
    idx = None  # batch positions of the active images; None while all are active
    t_a = target  # the target of the active images
    x_a, x_adv, x_prev = x, out_x.clone(), out_x.clone()
    x_best, g_best = x_adv, grad
    ret_n, ret_x = n_correct, x_adv
    # convergence (docs/flags.md, attack_unconverged): per image the correct
    # pixels of the returned point when the last tenth of the iterations starts
    # (-1: the image left before) and at the end; bookkeeping only
    late_from = n_iter - max(1, math.ceil(0.1 * n_iter))
    n_at_late = torch.full_like(ret_n, -1)
    n_final = ret_n.clone()

    def finish_run(points: Tensor) -> AttackOutput:
        stats['late_gain'] = torch.where(
            n_at_late >= 0, n_at_late - n_final, torch.zeros_like(n_final)
        )
        return finish(points)

    ctl = APGDStepSizeControl(n_iter, ce, 2.0 * radius, rho, first_window)
    if stall_stop:
        # collapsed step size: halved STALL_HALVINGS times (exact in floats)
        eta_floor = 2.0 * radius * 0.5**STALL_HALVINGS
        patience = stall_patience(n_iter)
        stalled_for = torch.zeros_like(ret_n)  # iterations without improvement
    with torch.no_grad():
        project = tm.projector(x_a, radius)
    for i in range(n_iter):
        if early_stop and not leave:
            # the reference's early stop: only once every image is at 0, and
            # tested after an update (at the end of the reference's loop body),
            # so the first update is always made, even from a batch that starts
            # at accuracy 0 (a later stage of APGDLargeEps)
            if i > 0 and not bool(ret_n.any()):
                break
        elif early_stop or stall_stop:
            # one sync per iteration, none per image
            done = ret_n == 0 if early_stop else torch.zeros_like(ret_n, dtype=bool)
            if stall_stop:
                done = done | ((ctl.eta <= eta_floor) & (stalled_for >= patience))
            if bool(done.any()):
                pos = torch.nonzero(done).squeeze(1) if idx is None else idx[done]
                out_x[pos] = ret_x[done]
                n_final[pos] = ret_n[done]
                if cand is not None:
                    for o, c in zip(out_cand, cand):
                        o[pos] = c[done]
                keep = ~done
                idx = torch.nonzero(keep).squeeze(1) if idx is None else idx[keep]
                if idx.numel() == 0:
                    return finish_run(out_x)
                x_a, x_adv, x_prev, grad, x_best, g_best, ret_n, ret_x = (
                    t[keep]
                    for t in (x_a, x_adv, x_prev, grad, x_best, g_best, ret_n, ret_x)
                )
                if stall_stop:
                    stalled_for = stalled_for[keep]
                if cand is not None:
                    cand = [c[keep] for c in cand]
                ctl.select(keep)
                t_a = target.subset(idx)
                with torch.no_grad():
                    project = tm.projector(x_a, radius)
        if i == late_from:
            if idx is None:
                n_at_late = ret_n.clone()
            else:
                n_at_late[idx] = ret_n
        last = i == n_iter - 1
        with torch.no_grad():
            # z = P(x + eta * dir(grad)); momentum update
            # x_new = P(x + a (z - x) + (1 - a) (x - x_prev)), a = 1 at the
            # first iteration, else 0.75; computed in the reference's order of
            # operations, so that compat='reference' also rounds as it does (a
            # 1-ulp difference can flip a tie of CE values and with it a
            # step-size decision)
            z = project(torch.addcmul(x_adv, bcast(ctl.eta, x_adv), tm.direction(grad)))
            a = 1.0 if i == 0 else _MOMENTUM
            x_new = project(x_adv + (z - x_adv) * a + (x_adv - x_prev) * (1.0 - a))
        x_prev, x_adv = x_adv, x_new
        # the last iterate needs no backward pass
        g, ce, n_correct, pred = _evaluate(
            t_a, objective, x_adv, i + 2, n_iter, not last, None, cand is not None
        )
        with torch.no_grad():
            if cand is not None:
                score = image_miou(pred, t_a.labels, t_a.valid, t_a.num_classes)
                lower = score <= cand[2]
                cand = [
                    torch.where(bcast(lower, c), new, c)
                    for c, new in zip(cand, (x_adv, pred, score))
                ]
            upd = better_iterate(n_correct, ret_n, newest_at_zero=not leave)
            if stall_stop:
                lower_acc = n_correct < ret_n
            ret_n = torch.where(upd, n_correct, ret_n)
            ret_x = torch.where(bcast(upd, x_adv), x_adv, ret_x)
            if last:
                break
            improved, halved = ctl.update(i, ce)
            if stall_stop:
                stalled_for = torch.where(
                    improved | lower_acc,
                    torch.zeros_like(stalled_for),
                    stalled_for + 1,
                )
            x_best = torch.where(bcast(improved, x_adv), x_adv, x_best)
            g_best = torch.where(bcast(improved, g), g, g_best)
            grad = g
            if halved is not None:
                # halved images restart from x_best with its gradient
                x_adv = torch.where(bcast(halved, x_adv), x_best, x_adv)
                grad = torch.where(bcast(halved, grad), g_best, grad)
    if idx is None:
        out_x = ret_x
        n_final = ret_n
        if cand is not None:
            out_cand = cand
    else:
        out_x[idx] = ret_x
        n_final[idx] = ret_n
        if cand is not None:
            for o, c in zip(out_cand, cand):
                o[idx] = c
    return finish_run(out_x)


# --------------------------------------------------------------------------------
# attacks
# --------------------------------------------------------------------------------
@ATTACKS.register_module()
class APGD(Attack):
    """Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with
    an ensemble of diverse parameter-free attacks", ICML 2020) for semantic
    segmentation, one run (docs/algorithms.md section 3.2).

    Threat model: L-inf (default) or L2 ball of radius ``eps/255`` in pixel space,
    clipped to ``[0, 1]``. Momentum 0.75, initial step ``2 * eps``, step halved at
    the checkpoints of :func:`apgd_checkpoints` under conditions (a)/(b) of
    :func:`step_size_halving` (on plain per-image CE); returns per image the
    iterate with the lowest pixel accuracy.

    Args:
        eps (float): radius in /255 units. Default: 8.
        norm (str): ``'Linf'`` or ``'L2'``. Default: ``'Linf'``.
        steps (int): iterations (``steps + 1`` forwards, ``steps`` backwards);
            ``n_iter`` (the reference's name) is accepted as an alias.
            Default: 100.
        loss (str | dict | Objective): objective (section 2). Default: ``'CE'``.
        rho (float): step-size condition (a) threshold. Default: 0.75.
        early_stop (bool): skip work that ``zero_acc`` allows skipping (see
            :func:`apgd_run`): with ``'leave'`` images at accuracy 0 leave the
            batch (no effect on the result); with ``'reference'`` a run ends once
            every image of the batch is at accuracy 0, tested after each update
            (the reference's stop; an image's result then depends on its batch).
            Default: True.
        zero_acc (str, optional): ``'leave'``: an image that reached accuracy 0
            keeps its first accuracy-0 iterate and is no longer optimised
            (faster); ``'reference'``: it keeps being optimised (momentum,
            restarts) and the newest accuracy-0 iterate is returned, as in the SEA
            reference. Its accuracy is 0 either way, but its predicted classes
            (hence the mIoU) and the next stage's starting point differ.
            Default: from ``compat``.
        first_window (str, optional): how the first step of each run counts for
            step-size condition (a) (:class:`APGDStepSizeControl`): ``'paper'``
            (``CE(x_1) > CE(x_0)``) or ``'reference'`` (always an increase).
            Default: from ``compat``.
        compat (str, optional): ``'reference'`` sets ``zero_acc`` and
            ``first_window`` to ``'reference'``; None (or ``'default'``) gives
            them the defaults :data:`DEFAULT_MODES`. Default: None.
        stall_stop (bool): opt-in speed-up: an image whose step size has
            collapsed (halved :data:`STALL_HALVINGS` times) and whose best CE and
            lowest accuracy have not improved for :func:`stall_patience`
            iterations leaves the run with its returned point so far (a
            different, cheaper attack; per image, so batch-independent; needs
            ``zero_acc='leave'``). Default: False.
        ignore_index (int): label value that never counts. Default: 255.
        eps_units (str, optional): ``'255'`` confirms that ``eps`` is in /255
            units: no unit warnings (:func:`~mmseg_robust.attacks.check_eps`).
            Default: None (checked).
        name (str, optional): name of the results (see :class:`Attack`).
            Default: ``'APGD-<objective>'``, e.g. ``'APGD-CE'``.
        miou_candidate (bool): also return, per image, the iterate of the
            (last) run with the lowest own mIoU as a second candidate for SEA's
            worst-case mIoU (docs/algorithms.md section 4.2; no pass more): the
            output then has two ``members``, ``name`` and ``name +
            MIOU_CANDIDATE_SUFFIX``, and is recorded under both. Default: False.

    :meth:`run` also takes ``init`` ``(B, 3, H, W)``: a starting point (projected
    onto the ball) instead of the random start.

    Shapes: images ``(B, 3, H, W)`` in ``[0, 1]``, labels long ``(B, H, W)``,
    valid bool ``(B, H, W)``; ``model(images)`` returns logits ``(B, K, H, W)``.

    Example:
        >>> attack = APGD(eps=8, steps=100, loss='Mask-CE')
        >>> adv_images = attack(model, images, labels)
    """

    def __init__(
        self,
        eps: float = 8,
        norm: str = 'Linf',
        steps: Optional[int] = None,
        loss: LossConfig = 'CE',
        rho: float = 0.75,
        early_stop: bool = True,
        ignore_index: int = 255,
        n_iter: Optional[int] = None,
        zero_acc: Optional[str] = None,
        first_window: Optional[str] = None,
        compat: Optional[str] = None,
        stall_stop: bool = False,
        eps_units: Optional[str] = None,
        name: Optional[str] = None,
        miou_candidate: bool = False,
    ) -> None:
        super().__init__(eps, norm, ignore_index, eps_units, name)
        self.miou_candidate = bool(miou_candidate)
        self.steps = resolve_steps(steps, n_iter, 100, type(self).__name__)
        self.compat, self.zero_acc, self.first_window, self.stall_stop = resolve_modes(
            compat, zero_acc, first_window, stall_stop, type(self).__name__
        )
        self.rho = float(rho)
        self.early_stop = bool(early_stop)
        self.objective = self._build_objective(loss)

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(eps={self.eps:g}, norm={self.norm!r}, '
            f'steps={self.steps}, loss={self.objective!r}, '
            f'zero_acc={self.zero_acc!r}, first_window={self.first_window!r}'
            f'{", stall_stop=True" if self.stall_stop else ""}'
            f'{", miou_candidate=True" if self.miou_candidate else ""})'
        )

    def objectives(self) -> List[Objective]:
        return [self.objective]

    def record_names(self) -> List[str]:
        return with_candidate_name(self.name, self.miou_candidate)

    def run(
        self,
        model,
        images: Tensor,
        labels: Tensor,
        valid: Optional[Tensor] = None,
        seeds: Optional[Sequence[int]] = None,
        init: Optional[Tensor] = None,
        progress: Optional[Callable[[str], None]] = None,
    ) -> AttackOutput:
        """Attack a batch (see :meth:`Attack.run`); ``init`` (optional)
        replaces the random start."""
        if init is not None:
            if not isinstance(init, Tensor) or init.shape != images.shape:
                raise ValueError(
                    f'init must be a tensor of the images shape '
                    f'{tuple(images.shape)}, got {getattr(init, "shape", init)}'
                )
            init = init.detach().to(device=images.device, dtype=torch.float32)
        return self._run(model, images, labels, valid, seeds, progress, init=init)

    def _attack(self, target, x, seeds, report, init=None) -> AttackOutput:
        tm = self.threat_model
        before = target.counter.snapshot(target.positions)
        with torch.no_grad():
            x0 = (
                tm.random_start(x, seeds=seeds) if init is None else tm.project(init, x)
            )
        out = apgd_run(
            target,
            self.objective,
            tm,
            x,
            x0,
            tm.radius,
            self.steps,
            self.rho,
            self.early_stop,
            zero_acc=self.zero_acc,
            first_window=self.first_window,
            stall_stop=self.stall_stop,
            miou_candidate=self.miou_candidate,
        )
        return with_miou_candidate(self.name, out, target, before)


@ATTACKS.register_module()
class APGDLargeEps(Attack):
    """APGD with progressive radius reduction, the per-attack optimiser of SEA
    (Croce, Singh & Hein, "Towards Reliable Evaluation and Fast Training of Robust
    Semantic Segmentation Models", ECCV 2024; docs/algorithms.md section 3.3).

    Threat model: L-inf (default) or L2 ball of radius ``eps/255`` in pixel space,
    clipped to ``[0, 1]``. Three APGD runs of ``[int(0.3 n), int(0.3 n), rest]``
    iterations at radii ``[2, 1.5, 1] * eps``: random start in the first stage
    only, each next stage starts from the previous stage's returned point projected
    onto its smaller ball, with step size and all tracking reset. The output is
    the last stage's returned point, so it lies in the eps-ball.

    Args:
        eps (float): final radius in /255 units. Default: 8.
        norm (str): ``'Linf'`` or ``'L2'``. Default: ``'Linf'``.
        steps (int): total iterations over all stages (alias ``n_iter``).
            Default: 300.
        loss (str | dict | Objective): objective (section 2). Default: ``'CE'``.
        radius_factors (sequence of float): stage radii / eps, the last must be 1.
            Default: ``(2.0, 1.5, 1.0)``.
        iter_fractions (sequence of float): iteration fraction of every stage but
            the last. Default: ``(0.3, 0.3)``.
        rho (float): step-size condition (a) threshold. Default: 0.75.
        early_stop (bool): skip work that ``zero_acc`` allows skipping (see
            :func:`apgd_run`): with ``'leave'`` images at accuracy 0 leave the
            batch (no effect on the result); with ``'reference'`` a stage ends once
            every image of the batch is at accuracy 0, tested after each update,
            so a stage that starts at accuracy 0 still makes one (the
            reference's stop; an image's result then depends on its batch).
            Default: True.
        zero_acc (str, optional): ``'leave'``: an image that reached accuracy 0
            keeps its first accuracy-0 iterate and is no longer optimised
            (faster); ``'reference'``: it keeps being optimised (momentum,
            restarts) and the newest accuracy-0 iterate is returned, as in the SEA
            reference. Its accuracy is 0 either way, but its predicted classes
            (hence the mIoU) and the next stage's starting point differ.
            Default: from ``compat``.
        first_window (str, optional): how the first step of each stage counts for
            step-size condition (a) (:class:`APGDStepSizeControl`): ``'paper'``
            (``CE(x_1) > CE(x_0)``) or ``'reference'`` (always an increase).
            Default: from ``compat``.
        compat (str, optional): ``'reference'`` sets ``zero_acc`` and
            ``first_window`` to ``'reference'``; None (or ``'default'``) gives
            them the defaults :data:`DEFAULT_MODES`. Default: None.
        stall_stop (bool): opt-in speed-up: an image whose step size has
            collapsed (halved :data:`STALL_HALVINGS` times) and whose best CE and
            lowest accuracy have not improved for :func:`stall_patience`
            iterations leaves the run (each stage) with its returned point so far (a
            different, cheaper attack; per image, so batch-independent; needs
            ``zero_acc='leave'``). Default: False.
        ignore_index (int): label value that never counts. Default: 255.
        eps_units (str, optional): ``'255'`` confirms that ``eps`` is in /255
            units: no unit warnings (:func:`~mmseg_robust.attacks.check_eps`).
            Default: None (checked).
        name (str, optional): name of the results (see :class:`Attack`).
            Default: ``'APGDLargeEps-<objective>'``.
        miou_candidate (bool): also return, per image, the iterate of the
            (last) run with the lowest own mIoU as a second candidate for SEA's
            worst-case mIoU (docs/algorithms.md section 4.2; no pass more): the
            output then has two ``members``, ``name`` and ``name +
            MIOU_CANDIDATE_SUFFIX``, and is recorded under both. Default: False.

    :meth:`run`'s ``progress`` callback receives ``'stage k/n: radius r/255, m
    iterations'`` at the start of each stage.

    Shapes: images ``(B, 3, H, W)`` in ``[0, 1]``, labels long ``(B, H, W)``,
    valid bool ``(B, H, W)``; ``model(images)`` returns logits ``(B, K, H, W)``.

    Example:
        >>> attack = APGDLargeEps(eps=8, steps=300, loss='Mask-CE')
        >>> adv_images = attack(model, images, labels)
    """

    def __init__(
        self,
        eps: float = 8,
        norm: str = 'Linf',
        steps: Optional[int] = None,
        loss: LossConfig = 'CE',
        radius_factors: Sequence[float] = (2.0, 1.5, 1.0),
        iter_fractions: Sequence[float] = (0.3, 0.3),
        rho: float = 0.75,
        early_stop: bool = True,
        ignore_index: int = 255,
        n_iter: Optional[int] = None,
        zero_acc: Optional[str] = None,
        first_window: Optional[str] = None,
        compat: Optional[str] = None,
        stall_stop: bool = False,
        eps_units: Optional[str] = None,
        name: Optional[str] = None,
        miou_candidate: bool = False,
    ) -> None:
        super().__init__(eps, norm, ignore_index, eps_units, name)
        self.miou_candidate = bool(miou_candidate)
        self.steps = resolve_steps(steps, n_iter, 300, type(self).__name__)
        self.compat, self.zero_acc, self.first_window, self.stall_stop = resolve_modes(
            compat, zero_acc, first_window, stall_stop, type(self).__name__
        )
        self.radius_factors = tuple(float(f) for f in radius_factors)
        self.iter_fractions = tuple(float(f) for f in iter_fractions)
        self.stages = radius_schedule(
            self.steps, self.eps, self.radius_factors, self.iter_fractions
        )
        self.rho = float(rho)
        self.early_stop = bool(early_stop)
        self.objective = self._build_objective(loss)

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(eps={self.eps:g}, norm={self.norm!r}, '
            f'steps={self.steps}, loss={self.objective!r}, '
            f'stages={self.stages}, zero_acc={self.zero_acc!r}, '
            f'first_window={self.first_window!r}'
            f'{", stall_stop=True" if self.stall_stop else ""}'
            f'{", miou_candidate=True" if self.miou_candidate else ""})'
        )

    def objectives(self) -> List[Objective]:
        return [self.objective]

    def record_names(self) -> List[str]:
        return with_candidate_name(self.name, self.miou_candidate)

    def _attack(self, target, x, seeds, report) -> AttackOutput:
        tm = self.threat_model
        before = target.counter.snapshot(target.positions)
        out, stats = None, None
        n = len(self.stages)
        for stage, (n_stage, eps_stage) in enumerate(self.stages):
            its = 'iteration' if n_stage == 1 else 'iterations'
            report(f'stage {stage + 1}/{n}: radius {eps_stage:g}/255, {n_stage} {its}')
            radius = eps_stage / 255.0
            with torch.no_grad():
                if stage == 0:
                    x0 = tm.random_start(x, radius, seeds)
                else:
                    x0 = tm.project(out.adv_images, x, radius)
            last = stage == len(self.stages) - 1
            out = apgd_run(
                target,
                self.objective,
                tm,
                x,
                x0,
                radius,
                n_stage,
                self.rho,
                self.early_stop,
                predict_output=last,
                stats=stats,
                zero_acc=self.zero_acc,
                first_window=self.first_window,
                stall_stop=self.stall_stop,
                miou_candidate=last and self.miou_candidate,
            )
            stats = out.stats
        return with_miou_candidate(self.name, out, target, before)


def with_candidate_name(name: str, miou_candidate: bool) -> List[str]:
    """``[name]``, and the name of its mIoU candidate with ``miou_candidate``
    (the names an attack's results are recorded under)."""
    return [name, name + MIOU_CANDIDATE_SUFFIX] if miou_candidate else [name]


def with_miou_candidate(
    name: str, out: AttackOutput, target: SegmentationTarget, before
) -> AttackOutput:
    """An :func:`apgd_run` output; with ``stats['miou_candidate']`` (its
    ``miou_candidate`` option), an output of two ``members``: ``name``, the
    run's own output with the passes spent since ``before`` (a
    :meth:`PassCounter.snapshot`), and ``name + MIOU_CANDIDATE_SUFFIX``, the
    mIoU candidate, with the ``start_*`` statistics and no passes of its own
    (docs/algorithms.md section 4.2). The returned point is the run's own."""
    cand = (out.stats or {}).get('miou_candidate')
    if cand is None:
        return out
    stats = {k: v for k, v in out.stats.items() if k != 'miou_candidate'}
    spent = PassCounter.spent(before, target.counter.snapshot(target.positions))
    main = out._replace(stats=dict(stats, **spent))
    start = {k: v for k, v in stats.items() if k.startswith('start_')}
    none = {k: torch.zeros_like(v) for k, v in spent.items()}
    members = {
        name: main,
        name + MIOU_CANDIDATE_SUFFIX: cand._replace(stats=dict(start, **none)),
    }
    worst = torch.zeros(out.adv_images.shape[0], dtype=torch.long)
    return main._replace(members=members, worst_member=worst.to(out.adv_images.device))
