"""SEA, the Segmentation Ensemble Attack (docs/algorithms.md section 4)."""

import hashlib
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from mmseg_robust.registry import ATTACKS

from .apgd import (
    APGDLargeEps,
    apgd_run,
    resolve_modes,
    with_candidate_name,
    with_miou_candidate,
)
from .base import (
    Attack,
    AttackOutput,
    PassCounter,
    SegmentationTarget,
    batch_stats,
    bcast,
    resolve_steps,
)
from .objectives import BalancedMaskedCrossEntropy, ClassWeights, Objective
from .seg_logits import num_correct

__all__ = ['SEA', 'derive_seeds']

#: The losses of the published SEA, in attack order (section 4).
SEA_LOSSES = ('Mask-CE-Bal', 'Mask-CE', 'JS-Avg')


def derive_seeds(seeds: Optional[Sequence[int]], salt: int) -> Optional[List[int]]:
    """Per-image seeds for the ``salt``-th sub-attack, a deterministic function of
    each image's own seed (independent of batch composition and process)."""
    if seeds is None:
        return None
    out = []
    for s in seeds:
        digest = hashlib.blake2b(
            f'{int(s)}/{int(salt)}'.encode(), digest_size=8
        ).digest()
        out.append(int.from_bytes(digest, 'little') >> 1)  # fits int64
    return out


@ATTACKS.register_module()
class SEA(Attack):
    """Segmentation Ensemble Attack (Croce, Singh & Hein, "Towards Reliable
    Evaluation and Fast Training of Robust Semantic Segmentation Models", ECCV
    2024; docs/algorithms.md section 4).

    Threat model: L-inf (default) or L2 ball of radius ``eps/255`` in pixel space,
    clipped to ``[0, 1]``. Runs one :class:`APGDLargeEps` attack (progressive radius
    ``2, 1.5, 1 x eps``) per loss, each independently from the clean input, in
    order: Mask-CE-Bal, Mask-CE, JS-Avg (about ``3 * steps`` forward and backward
    passes per image). :meth:`run` returns, per image, the output with the lowest
    pixel accuracy (ties: the earlier attack), and every member attack's own
    output in ``members`` (what the worst-case mIoU needs); member ``a`` uses the
    seeds ``derive_seeds(seeds, a)``.

    Args:
        eps (float): radius in /255 units. Default: 8.
        steps (int): iterations of each attack (alias ``n_iter``, the
            reference's name). Default: 300.
        norm (str): ``'Linf'`` or ``'L2'``. Default: ``'Linf'``.
        losses (sequence of str | dict | Objective): one attack per entry. Default:
            ``('Mask-CE-Bal', 'Mask-CE', 'JS-Avg')``.
        class_weights (str | sequence of float, optional): Mask-CE-Bal class
            weights, ``'voc'`` | ``'ade20k'`` | a list of K weights; required when
            Mask-CE-Bal is among ``losses`` (unless its dict config has them).
        early_stop (bool): skip work that ``zero_acc`` allows skipping: with
            ``'leave'`` images at accuracy 0 leave a stage's batch (no effect on
            the result); with ``'reference'`` a stage ends once every image of the
            batch is at accuracy 0, tested after each update (as the reference).
            Default: True.
        zero_acc (str, optional): ``'leave'`` or ``'reference'``: whether an
            image at accuracy 0 keeps its first accuracy-0 iterate and stops
            being optimised, or is optimised on and returns its newest one (the
            reference). See :class:`APGDLargeEps`. Default: from ``compat``.
        first_window (str, optional): ``'paper'`` or ``'reference'``: the count
            of the first step of each stage by the step-size control (see
            :class:`~mmseg_robust.attacks.APGDStepSizeControl`). Default: from
            ``compat``.
        compat (str, optional): ``'reference'`` sets both options to
            ``'reference'``, reproducing the SEA reference's optimiser; None
            (or ``'default'``) gives both their defaults
            (:data:`~mmseg_robust.attacks.apgd.DEFAULT_MODES`). Default: None.
        stall_stop (bool): opt-in speed-up passed to every member: an image whose
            step size has collapsed and whose best CE and lowest accuracy have not
            improved for a window leaves the stage (see
            :class:`APGDLargeEps`; docs/algorithms.md section 3.2). Not the
            default: a different, cheaper attack (benchmarks/bench_fast_sea.py).
            Default: False.
        ignore_index (int): label value that never counts. Default: 255.
        eps_units (str, optional): ``'255'`` confirms that ``eps`` is in /255
            units: no unit warnings (:func:`~mmseg_robust.attacks.check_eps`).
            Default: None (checked).
        name (str, optional): prefix of the members' names: with
            ``name='SEA-100'`` the members are recorded as
            ``'SEA-100:APGD-Mask-CE-Bal'``, ... (two SEA settings in one
            evaluation). Default: None, the members are ``'APGD-<loss>'``.
        refine_steps (int): iterations of a refinement stage after the members
            (docs/algorithms.md section 4.1; not part of the published SEA):
            every image not at accuracy 0 is attacked once more, from its worst
            case so far, by one APGD run at the full radius with the loss of
            the member that gave that worst case (step size reset, no random
            start). Recorded as one more member, ``'Refine'`` (prefixed like the
            others); about ``len(losses) * steps + refine_steps`` passes per
            image. Default: 0 (the published SEA).
        miou_candidates (bool): every member (and the refinement) also
            returns, per image, the iterate of its last stage with the lowest
            own mIoU, recorded as ``'<member>:mIoU-iterate'``: one more
            candidate per member for the worst-case mIoU's greedy, at no pass
            more (docs/algorithms.md section 4.2; not part of the published
            SEA). The returned point and the worst-case aACC stay the members'
            lowest-accuracy points. Default: False.

    :meth:`run`'s ``progress`` callback receives each member's name as it starts
    and the member's own progress (its stages) as ``'<name>: <text>'``.

    Shapes: images ``(B, 3, H, W)`` in ``[0, 1]``, labels long ``(B, H, W)``,
    valid bool ``(B, H, W)``; ``model(images)`` returns logits ``(B, K, H, W)``.

    Example:
        >>> sea = SEA(eps=8, steps=300, class_weights='ade20k')
        >>> out = sea.run(model, images, labels, seeds=image_ids)
        >>> per_attack = out.members  # {'APGD-Mask-CE-Bal': AttackOutput, ...}
    """

    def __init__(
        self,
        eps: float = 8,
        steps: Optional[int] = None,
        norm: str = 'Linf',
        losses: Sequence[Union[str, dict, Objective]] = SEA_LOSSES,
        class_weights: Optional[ClassWeights] = None,
        early_stop: bool = True,
        ignore_index: int = 255,
        n_iter: Optional[int] = None,
        zero_acc: Optional[str] = None,
        first_window: Optional[str] = None,
        compat: Optional[str] = None,
        stall_stop: bool = False,
        eps_units: Optional[str] = None,
        name: Optional[str] = None,
        refine_steps: int = 0,
        miou_candidates: bool = False,
    ) -> None:
        super().__init__(eps, norm, ignore_index, eps_units, name)
        self.compat, self.zero_acc, self.first_window, self.stall_stop = resolve_modes(
            compat, zero_acc, first_window, stall_stop, type(self).__name__
        )
        self.early_stop = bool(early_stop)
        if isinstance(refine_steps, bool) or not isinstance(refine_steps, int):
            raise TypeError(
                f'refine_steps must be an int (iterations), got {refine_steps!r}'
            )
        if refine_steps < 0:
            raise ValueError(
                f'refine_steps must be >= 0 (0: no refinement), got {refine_steps}'
            )
        if refine_steps and self.compat == 'reference':
            raise ValueError(
                "refine_steps is not part of the reference SEA that compat='reference' "
                'reproduces: drop one of them'
            )
        if miou_candidates and self.compat == 'reference':
            raise ValueError(
                'miou_candidates is not part of the reference SEA that '
                "compat='reference' reproduces: drop one of them"
            )
        self.refine_steps = refine_steps
        self.miou_candidates = bool(miou_candidates)
        if isinstance(losses, (str, dict)) or len(losses) == 0:
            raise ValueError(
                f'losses must be a non-empty sequence of objectives, got {losses!r}'
            )
        self.steps = resolve_steps(steps, n_iter, 300, type(self).__name__)
        self.attacks: Dict[str, APGDLargeEps] = {}
        for loss in losses:
            cfg = _with_class_weights(loss, class_weights)
            attack = APGDLargeEps(
                eps=eps,
                norm=norm,
                steps=self.steps,
                loss=cfg,
                early_stop=early_stop,
                ignore_index=ignore_index,
                zero_acc=self.zero_acc,
                first_window=self.first_window,
                stall_stop=stall_stop,
                eps_units=eps_units,
                miou_candidate=self.miou_candidates,
            )
            name = base = f'APGD-{_loss_name(attack.objective)}'
            if self._name is not None:
                name = base = f'{self._name}:{base}'
            k = 2
            while name in self.attacks:
                name, k = f'{base}-{k}', k + 1
            self.attacks[name] = attack
        self.refine_name = 'Refine' if self._name is None else f'{self._name}:Refine'

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(eps={self.eps:g}, norm={self.norm!r}, '
            f'steps={self.steps}, attacks={list(self.attacks)}, '
            f'zero_acc={self.zero_acc!r}, first_window={self.first_window!r}'
            f'{", stall_stop=True" if self.stall_stop else ""}'
            f'{f", refine_steps={self.refine_steps}" if self.refine_steps else ""}'
            f'{", miou_candidates=True" if self.miou_candidates else ""})'
        )

    def objectives(self) -> List[Objective]:
        return [a.objective for a in self.attacks.values()]

    def record_names(self) -> List[str]:
        """The members' names (and the refinement's, ``refine_steps > 0``):
        the results are recorded per member."""
        names = list(self.attacks)
        if self.refine_steps:
            names.append(self.refine_name)
        return [n for m in names for n in with_candidate_name(m, self.miou_candidates)]

    def _attack(
        self,
        target: SegmentationTarget,
        x: Tensor,
        seeds: Optional[List[int]],
        report: Callable[[str], None],
    ) -> AttackOutput:
        members = {}  # name: the member's own output
        for a, (name, attack) in enumerate(self.attacks.items()):
            report(name)
            members[name] = attack.attack_target(
                target, x, derive_seeds(seeds, a), _prefixed(report, name)
            )
        if self.refine_steps:
            adv, pred, worst = _worst_case(target, list(members.values()))
            report(self.refine_name)
            members[self.refine_name] = self._refine(target, x, adv, pred, worst)
        adv, pred, worst = _worst_case(target, list(members.values()))
        if self.miou_candidates:
            # each output and its mIoU candidate (section 4.2), recorded
            # side by side; the worst case stays over the outputs themselves
            members = {
                n: o
                for name, out in members.items()
                for n, o in zip(with_candidate_name(name, True), out.members.values())
            }
            worst = 2 * worst
        return AttackOutput(adv, pred, self._stats(target, x, adv), members, worst)

    def _refine(
        self,
        target: SegmentationTarget,
        x: Tensor,
        adv: Tensor,
        pred: Tensor,
        worst: Tensor,
    ) -> AttackOutput:
        """The refinement stage (``refine_steps``): per image not at accuracy
        0, one APGD run at the full radius from ``adv`` (its worst case so far)
        with the objective of its worst member ``worst``; the other images keep
        ``adv``. The runs are grouped by member; APGD's result for an image does
        not depend on the other images of its run (``zero_acc='leave'``)."""
        before = target.counter.snapshot(target.positions)
        left = num_correct(pred, target.labels, target.valid) > 0
        out_adv, out_pred = adv.clone(), pred.clone()
        # the mIoU candidate: the images not refined keep their point
        cand_adv, cand_pred = adv.clone(), pred.clone()
        late = torch.zeros_like(worst)
        for a, attack in enumerate(self.attacks.values()):
            idx = torch.nonzero(left & (worst == a)).squeeze(1)
            if idx.numel() == 0:
                continue
            run = apgd_run(
                target.subset(idx),
                attack.objective,
                self.threat_model,
                x[idx],
                adv[idx].detach(),
                self.eps / 255.0,
                self.refine_steps,
                attack.rho,
                self.early_stop,
                zero_acc=self.zero_acc,
                first_window=self.first_window,
                stall_stop=self.stall_stop,
                miou_candidate=self.miou_candidates,
            )
            out_adv[idx] = run.adv_images
            out_pred[idx] = run.adv_pred
            late[idx] = run.stats['late_gain']
            if self.miou_candidates:
                cand = run.stats['miou_candidate']
                cand_adv[idx], cand_pred[idx] = cand.adv_images, cand.adv_pred
        stats = self._stats(target, adv, out_adv)
        if self.miou_candidates:
            stats['miou_candidate'] = AttackOutput(cand_adv, cand_pred, {})
        out = AttackOutput(out_adv, out_pred, dict(stats, late_gain=late))
        if self.miou_candidates:
            return with_miou_candidate(self.refine_name, out, target, before)
        spent = PassCounter.spent(before, target.counter.snapshot(target.positions))
        return out._replace(stats=dict(out.stats, **spent))

    @staticmethod
    def _stats(target: SegmentationTarget, start: Tensor, end: Tensor) -> dict:
        """``start_*`` at ``start`` and ``final_*`` at ``end``: two forwards,
        no backward (SEA: the clean images, where every member starts, and the
        worst case; the refinement: its starting and returned points)."""
        with torch.no_grad():
            return dict(
                batch_stats(target.evaluate(start), 'start'),
                **batch_stats(target.evaluate(end), 'final'),
            )


def _worst_case(target: SegmentationTarget, outs: List[AttackOutput]):
    """Per image the output with the lowest accuracy, i.e. the fewest correct
    valid pixels (the valid count is the same for every output; ties: the
    first): ``(adv_images, adv_pred, index of the output)``."""
    counts = torch.stack(
        [num_correct(o.adv_pred, target.labels, target.valid) for o in outs]
    )
    worst = counts.argmin(dim=0)
    adv, pred = outs[0].adv_images, outs[0].adv_pred
    for a, o in enumerate(outs[1:], start=1):
        pick = worst == a
        adv = torch.where(bcast(pick, adv), o.adv_images, adv)
        pred = torch.where(bcast(pick, pred), o.adv_pred, pred)
    return adv, pred, worst


def _prefixed(report: Callable[[str], None], name: str) -> Callable[[str], None]:
    """``report`` with each text prefixed by ``'<name>: '``."""
    return lambda text: report(f'{name}: {text}')


def _loss_name(objective: Objective) -> str:
    return objective.name or type(objective).__name__


def _with_class_weights(loss, class_weights):
    """The loss config, with SEA's ``class_weights`` filled in for Mask-CE-Bal."""
    if isinstance(loss, Objective):
        return loss
    cfg = dict(type=loss) if isinstance(loss, str) else dict(loss)
    kind = cfg.get('type')
    is_bal = kind == 'Mask-CE-Bal' or (
        isinstance(kind, type) and issubclass(kind, BalancedMaskedCrossEntropy)
    )
    if is_bal and cfg.get('class_weights') is None:
        if class_weights is None:
            raise ValueError(
                "SEA's Mask-CE-Bal attack needs class weights: pass "
                "class_weights='voc' | 'ade20k' | a list of K per-class weights "
                "(or drop 'Mask-CE-Bal' from losses)"
            )
        cfg['class_weights'] = class_weights
    return cfg
