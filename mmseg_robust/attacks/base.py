"""Attack base class, input checks and the model view (docs/algorithms.md section 1).

An attack sees a *pixel-space model view*: any callable ``model(images) -> logits``
with images ``(B, 3, H, W)`` in ``[0, 1]`` and logits ``(B, K, H', W')`` at the
resolution of the labels ``(B, H', W')`` (usually ``H' = H``, ``W' = W``).
Attacks never touch parameter gradients: they differentiate the objective w.r.t.
the input only (``torch.autograd.grad``), in fp32, under ``torch.enable_grad()``
(autocast around an attack is turned off; a view may run its model in bf16
itself, :mod:`~mmseg_robust.models.cheaper_passes`, and hands back fp32 logits).
A model (``nn.Module``, or a view holding one as ``.model``) left in train mode is
attacked in eval mode and put back in train mode afterwards, with a warning, so its
BatchNorm buffers are untouched and dropout does not randomise the attack.
"""

import contextlib
import copy
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .attack_warning import AttackWarning
from .objectives import Objective, build_objective
from .seg_logits import SegLogits, check_labels, effective_valid
from .threat_model import ThreatModel

__all__ = [
    'Attack',
    'AttackOutput',
    'CONVERGENCE_KEYS',
    'PASS_KEYS',
    'PassCounter',
    'STATS_KEYS',
    'SegmentationTarget',
    'resolve_steps',
]

#: The per-image pass counts in :attr:`AttackOutput.stats` (long ``(B,)``):
#: forward+backward passes and forward-only passes through the model view
#: (docs/algorithms.md section 3.6).
PASS_KEYS = ('passes', 'forwards')
#: per-image convergence statistics of APGD runs (docs/flags.md, attack_unconverged)
CONVERGENCE_KEYS = ('late_gain',)
#: The keys of :attr:`AttackOutput.stats`, the same for every attack.
STATS_KEYS = ('start_loss', 'start_acc', 'final_loss', 'final_acc') + PASS_KEYS

ModelView = Callable[[Tensor], Tensor]


class AttackOutput(NamedTuple):
    """Result of :meth:`Attack.run`.

    Attributes:
        adv_images (Tensor): adversarial images ``(B, 3, H, W)`` in ``[0, 1]``, in
            the eps-ball around the clean images.
        adv_pred (Tensor | None): long ``(B, H, W)``, argmax of the logits at
            ``adv_images``; None when the attack was asked not to forward them
            (:class:`~mmseg_robust.attacks.PGD`'s ``predict_output=False``).
        stats (dict, optional): batch statistics, the keys of
            :data:`STATS_KEYS` for every attack: ``start_loss``/``start_acc`` at
            the attack's first iterate (the clean images for attacks without
            random start, and for ensembles) and ``final_loss``/``final_acc`` at
            the returned images (mean CE over valid pixels and pixel accuracy,
            0-d tensors); without ``adv_pred``, ``last_loss``/``last_acc`` of
            the last iterate the attack evaluated instead of ``final_*``; and
            the budget the call spent per image (:data:`PASS_KEYS`, long
            ``(B,)``): ``passes``, forward passes through the model view
            followed by a backward pass through it, and ``forwards``, forward
            passes without one (an ensemble: its members' and its own); APGD
            runs add ``late_gain`` (:data:`CONVERGENCE_KEYS`, long ``(B,)``):
            the pixels the returned point flipped in the last tenth of the
            iterations.
        members (dict, optional): for an ensemble (:class:`SEA`), each member
            attack's own output by name, in attack order; ``adv_images`` and
            ``adv_pred`` are then their worst case per image. None for a single
            attack (see :meth:`by_attack`).
        worst_member (Tensor, optional): for an ensemble, long ``(B,)``: per
            image the position in ``members`` of the output it returns.
    """

    adv_images: Tensor
    adv_pred: Tensor
    stats: Optional[dict] = None
    members: Optional[Dict[str, 'AttackOutput']] = None
    worst_member: Optional[Tensor] = None

    def source(self, name: str, i: int) -> str:
        """The name of the attack that produced image ``i``: ``name`` for a
        single attack, the member's name for an ensemble."""
        if not self.members or self.worst_member is None:
            return name
        return list(self.members)[int(self.worst_member[i])]

    def by_attack(self, name: str) -> Dict[str, 'AttackOutput']:
        """The outputs of the single attacks this output consists of: the
        members of an ensemble, else ``{name: self}``."""
        return dict(self.members) if self.members else {name: self}


def _no_autocast(device: torch.device):
    """Disable autocast around the forward so attacks run in fp32 (a no-op, and no
    per-iteration cost, when autocast is off already)."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, TypeError):  # a device type without autocast support
        return contextlib.nullcontext()


class PassCounter:
    """Per-image counts of the passes through the model view of one attack call
    (docs/algorithms.md section 3.6).

    Every forward of :meth:`SegmentationTarget.forward` adds one to
    ``forwards`` of the images it forwards; a backward pass that reaches the
    logits of a forward (a hook on them) adds one to ``backwards`` of those
    images. Counting the passes that happen, rather than what an attack
    believes it spends, keeps the counts right for any optimiser, including
    third-party ones (:mod:`~mmseg_robust.attacks.minimal_norm`) and images
    that leave a batch early. Counts stay on the device (no synchronisation
    per iteration).

    Args:
        batch_size (int): images of the call.
        device (torch.device): where the counts live.
    """

    def __init__(self, batch_size: int, device) -> None:
        self.forwards = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.backwards = torch.zeros_like(self.forwards)

    def snapshot(self, positions: Optional[Tensor]) -> Tensor:
        """``(forwards, backwards)`` of the images at ``positions`` (all:
        None), stacked ``(2, n)``, a copy."""
        both = torch.stack([self.forwards, self.backwards])
        return both.clone() if positions is None else both[:, positions]

    @staticmethod
    def spent(before: Tensor, after: Tensor) -> Dict[str, Tensor]:
        """The :data:`PASS_KEYS` between two snapshots: ``passes`` (forward and
        backward) and ``forwards`` (forward only)."""
        forwards, backwards = after - before
        return dict(passes=backwards, forwards=forwards - backwards)

    def _add(self, counts: Tensor, positions: Optional[Tensor]) -> None:
        if positions is None:
            counts += 1
        else:
            counts.index_add_(0, positions, torch.ones_like(positions))


class SegmentationTarget:
    """The model view, labels and valid mask of one attack call.

    Forwards images and wraps the logits in a :class:`SegLogits`. The first
    forward checks the logits' shape and, now that K is known, the labels and the
    objectives' per-class parameters. :meth:`subset` gives the target of some
    images of the batch (attacks whose finished images leave the batch).

    Args:
        model (callable): ``model(images) -> logits`` ``(B, K, H, W)``.
        labels (Tensor): long ``(B, H, W)``.
        valid (Tensor, optional): bool ``(B, H, W)``, False for padding.
        ignore_index (int): label value that never counts. Default: 255.
        objectives (sequence of Objective): objectives to check against K.

    Example:
        >>> target = SegmentationTarget(model, labels, valid)
        >>> s = target.evaluate(images)  # SegLogits: s.ce, s.pred, s.accuracy
    """

    def __init__(
        self,
        model: ModelView,
        labels: Tensor,
        valid: Optional[Tensor] = None,
        ignore_index: int = 255,
        objectives: Sequence[Objective] = (),
    ) -> None:
        self.model = model
        self.raw_labels = labels
        self.raw_valid = valid
        self.ignore_index = ignore_index
        self.objectives = list(objectives)
        # effective valid = valid & (labels != ignore_index) (section 1)
        self.valid = effective_valid(labels, valid, ignore_index)
        self.labels = torch.where(self.valid, labels, labels.new_zeros(()))
        # one sync per attack call: with every pixel valid the per-iteration
        # reductions skip the mask
        self.all_valid = bool(self.valid.all())
        self.num_classes: Optional[int] = None
        self.counter = PassCounter(labels.shape[0], labels.device)
        # batch positions of this target's images in the counter (None: all)
        self.positions: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        """fp32 logits of the model at ``x``; checks the shape on first use."""
        with _no_autocast(x.device):
            logits = self.model(x)
        self._count(logits, x.shape[0])
        if (
            not isinstance(logits, Tensor)
            or logits.dim() != 4
            or logits.shape[0] != x.shape[0]
            or logits.shape[2:] != self.labels.shape[1:]
        ):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits)
            raise ValueError(
                f'the model view must return logits (B, K, H, W) at the label '
                f'resolution {tuple(self.labels.shape[1:])} for images '
                f'{tuple(x.shape)}, got {got}; resize the logits inside the model '
                'view'
            )
        if self.num_classes is None:
            self._first_forward(logits.shape[1])
        return logits.float()

    def _count(self, logits, batch_size: int) -> None:
        """Count a forward of this target's images and, through a hook on the
        logits, the backward pass that may follow (:class:`PassCounter`)."""
        if not isinstance(logits, Tensor) or logits.shape[:1] != (batch_size,):
            return  # the shape check below raises
        counter, positions = self.counter, self.positions
        held = counter.forwards.numel() if positions is None else positions.numel()
        if batch_size != held:
            raise ValueError(
                f'the model view got {batch_size} images, the attack target '
                f'holds {held}: forward a subset of the images through the '
                'target of target.subset(...), so that each image is counted'
            )
        counter._add(counter.forwards, positions)
        if logits.requires_grad:

            def on_backward(grad):
                counter._add(counter.backwards, positions)

            logits.register_hook(on_backward)

    def _first_forward(self, num_classes: int) -> None:
        check_labels(self.raw_labels, num_classes, self.ignore_index, self.raw_valid)
        for obj in self.objectives:
            obj.check_num_classes(num_classes)
        self.num_classes = num_classes

    def evaluate(self, x: Tensor, step: int = 1, total_steps: int = 1) -> SegLogits:
        """Forward ``x`` and wrap the logits with this target's labels."""
        return SegLogits(
            self.forward(x),
            self.labels,
            self.valid,
            step,
            total_steps,
            all_valid=self.all_valid,
        )

    def subset(self, keep: Tensor) -> 'SegmentationTarget':
        """The target of the images selected by ``keep`` (bool or index tensor)."""
        if self.num_classes is None:
            raise RuntimeError('subset() needs a first forward (labels unchecked)')
        sub = copy.copy(self)
        sub.labels, sub.valid = self.labels[keep], self.valid[keep]
        base = self.positions
        if base is None:
            base = torch.arange(self.labels.shape[0], device=self.labels.device)
        sub.positions = base[keep]
        # all_valid stays true for a subset; a False may become stale-but-safe
        sub.raw_labels = sub.raw_valid = None  # checked already
        return sub


def input_gradient(objective: Tensor, x: Tensor) -> Tensor:
    """``d objective / d x`` without touching parameter gradients."""
    if not objective.requires_grad:
        raise RuntimeError(
            'the attack objective does not depend on the input with gradients: '
            'the model view must not run under torch.no_grad() nor detach its '
            'input or logits'
        )
    (grad,) = torch.autograd.grad(objective, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def better_iterate(
    n_correct: Tensor, best_n_correct: Tensor, newest_at_zero: bool = False
) -> Tensor:
    """Whether a new iterate replaces the returned one, per image (section 3.2).

    Lower pixel accuracy wins; ties go to the newer iterate, except at accuracy 0
    unless ``newest_at_zero``: by default an image that reached accuracy 0 keeps
    that point (so it can leave the batch); with ``newest_at_zero`` (APGD's
    ``zero_acc='reference'``) every later accuracy-0 iterate replaces it, as in
    the SEA reference. Comparing correct-pixel counts is exact.
    """
    if newest_at_zero:
        return n_correct <= best_n_correct
    return (n_correct < best_n_correct) | (
        (n_correct == best_n_correct) & (best_n_correct > 0)
    )


def bcast(mask: Tensor, like: Tensor) -> Tensor:
    """View a per-image ``(B,)`` tensor as ``(B, 1, ..., 1)`` to match ``like``."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def batch_stats(s: SegLogits, prefix: str) -> dict:
    """Mean CE over valid pixels and pixel accuracy of a batch (0-d tensors),
    as ``{prefix}_loss`` and ``{prefix}_acc``."""
    with torch.no_grad():
        n_valid = s.valid.sum().clamp_min(1)
        ce = torch.where(s.valid, s.ce.detach(), 0.0)
        return {
            f'{prefix}_loss': ce.sum() / n_valid,
            f'{prefix}_acc': s.num_correct.sum() / n_valid,
        }


def output_at(
    target: SegmentationTarget, points: Tensor, stats: Optional[dict] = None
) -> AttackOutput:
    """The attack output for ``points``: one forward gives the prediction and the
    ``final_*`` statistics (added to ``stats``, which holds the ``start_*``)."""
    with torch.no_grad():
        s = target.evaluate(points)
        return AttackOutput(
            points, s.pred, dict(stats or {}, **batch_stats(s, 'final'))
        )


_TRAIN_MODE_WARNING = (
    'the model is in train mode: BatchNorm statistics would change and dropout '
    'would randomise the attack; attacking in eval mode (model.eval()) and '
    'restoring train mode afterwards'
)


def _modules_of(model) -> List[torch.nn.Module]:
    """The ``nn.Module`` a model view is or wraps (``.model``), if any."""
    found = []
    for m in (model, getattr(model, 'model', None)):
        if isinstance(m, torch.nn.Module) and all(m is not f for f in found):
            found.append(m)
    return found


@contextlib.contextmanager
def eval_mode(model):
    """Run the block with the model's module(s) in eval mode, then restore every
    submodule's own ``training`` flag; warns when a module was in train mode.
    A view without a module (a plain callable) is left alone."""
    flags = [(sub, sub.training) for m in _modules_of(model) for sub in m.modules()]
    if not any(training for _, training in flags):
        yield
        return
    warnings.warn(_TRAIN_MODE_WARNING, AttackWarning, stacklevel=5)
    for sub, _ in flags:
        sub.training = False
    try:
        yield
    finally:
        for sub, training in flags:
            sub.training = training


def resolve_steps(
    steps: Optional[int], n_iter: Optional[int], default: int, owner: str
) -> int:
    """The iteration count of an attack: ``steps``, or its alias ``n_iter`` (the
    SEA/APGD reference's name); both given and different is an error, and so is
    0 (the attack would return its starting point)."""
    name = 'steps'
    if n_iter is not None:
        if steps is not None and steps != n_iter:
            raise ValueError(
                f'{owner}: steps={steps} and n_iter={n_iter} disagree; '
                'n_iter is an alias of steps, give one of them'
            )
        steps, name = n_iter, 'n_iter'
    if steps is None:
        steps = default
    if (
        isinstance(steps, bool)
        or not isinstance(steps, (int, float))
        or int(steps) != steps
        or steps < 0
    ):
        raise ValueError(f'{owner}: {name} must be an int >= 1, got {steps!r}')
    if steps == 0:
        raise ValueError(
            f'{owner}: {name}=0 is zero iterations: the attack would return the '
            f'clean images (or its random start) unchanged; give {name} >= 1 '
            '(for clean numbers use eps=0 or evaluate without attack)'
        )
    return int(steps)


def _ignore(text: str) -> None:
    """The ``report`` of a call without ``progress``."""


def _reporter(progress: Optional[Callable[[str], None]]) -> Callable[[str], None]:
    return _ignore if progress is None else progress


class Attack:
    """Base class of the attacks of :mod:`mmseg_robust.attacks` (threat model of
    docs/algorithms.md section 1, objectives of section 2).

    Subclasses implement :meth:`_attack`; ensembles call their members'
    :meth:`attack_target`. Build registered attacks with
    ``ATTACKS.build(dict(type='PGD', eps=8, steps=10))``.

    Args:
        eps (float): radius in /255 units (``eps=8`` is ``8/255``). Default: 8.
        norm (str): ``'Linf'`` or ``'L2'`` (case-insensitive). Default: ``'Linf'``.
        ignore_index (int): label value that never counts. Default: 255.
        eps_units (str, optional): ``'255'`` confirms that ``eps`` is meant in
            /255 units (no warnings about [0, 1] units, see
            :func:`~mmseg_robust.attacks.check_eps`). Default: None (checked).
        name (str, optional): the name the attack's results are recorded under
            (results file, cache, report). Default: :meth:`default_name`, the
            class name and the objective (``'APGD-CE'``, ``'PGD-SegPGD'``); two
            attacks of one evaluation need different names.

    Inputs of :meth:`run` / ``__call__``: ``model(images) -> logits`` ``(B, K, H,
    W)``; images float ``(B, 3, H, W)`` in ``[0, 1]``; labels long ``(B, H, W)`` in
    ``[0, K)`` or ``ignore_index``; valid bool ``(B, H, W)`` (False = padding),
    optional; seeds: ``B`` ints, optional (per-image random starts, independent of
    batch composition and of the global RNG).

    Example:
        >>> attack = ATTACKS.build(dict(type='PGD', eps=8, steps=10))
        >>> adv_images = attack(model, images, labels)
    """

    def __init__(
        self,
        eps: float = 8,
        norm: str = 'Linf',
        ignore_index: int = 255,
        eps_units: Optional[str] = None,
        name: Optional[str] = None,
    ) -> None:
        self.threat_model = ThreatModel(eps, norm, eps_units)
        self.ignore_index = ignore_index
        if name is not None and (
            not isinstance(name, str) or not name.strip() or '/' in name
        ):
            raise ValueError(
                f'{type(self).__name__}: name must be a non-empty string without '
                f"'/' (results are keyed 'eps8/<name>/mIoU'), got {name!r}"
            )
        self._name = name

    @property
    def name(self) -> str:
        """The name the results of this attack are recorded under."""
        return self._name if self._name is not None else self.default_name()

    def default_name(self) -> str:
        """The class name, joined by ``-`` to the objective's name when the
        attack has exactly one (``'APGD-CE'``, ``'PGD-SegPGD'``, ``'FGSM-CE'``),
        so that attacks of one class with different objectives are told apart.
        """
        objectives = self.objectives()
        if len(objectives) != 1:
            return type(self).__name__
        objective = objectives[0]
        return f'{type(self).__name__}-{objective.name or type(objective).__name__}'

    def record_names(self) -> List[str]:
        """The names under which :meth:`AttackOutput.by_attack` reports this
        attack's results: its :attr:`name` (ensembles: their members')."""
        return [self.name]

    @property
    def eps(self) -> float:
        """Radius in /255 units."""
        return self.threat_model.eps

    @property
    def n_iter(self) -> int:
        """Alias of ``steps`` (the name the APGD/SEA reference uses)."""
        return self.steps

    @property
    def norm(self) -> str:
        """``'Linf'`` or ``'L2'``."""
        return self.threat_model.norm

    def __repr__(self) -> str:
        return f'{type(self).__name__}(eps={self.eps:g}, norm={self.norm!r})'

    def objectives(self) -> List[Objective]:
        """Objectives the attack uses (checked against K at the first forward)."""
        return []

    # ---------------------------------------------------------------- public API
    def run(
        self,
        model: ModelView,
        images: Tensor,
        labels: Tensor,
        valid: Optional[Tensor] = None,
        seeds: Optional[Sequence[int]] = None,
        progress: Optional[Callable[[str], None]] = None,
    ) -> AttackOutput:
        """Attack a batch.

        Args:
            progress (callable, optional): called with a short text (e.g. the
                name of the ensemble member starting, an APGD stage) as the
                attack goes on.

        A model left in train mode (an ``nn.Module``, or a view with the module
        as ``.model``) is attacked in eval mode, with a warning, and put back in
        train mode afterwards: its buffers are not changed by the attack.

        Returns:
            AttackOutput: ``adv_images`` ``(B, 3, H, W)`` in ``[0, 1]`` (in the
            dtype of ``images``), ``adv_pred`` long ``(B, H, W)``, ``stats``
            and, for ensembles, ``members``.
        """
        return self._run(model, images, labels, valid, seeds, progress)

    def _run(self, model, images, labels, valid, seeds, progress, **kwargs):
        """:meth:`run` with extra keyword arguments for :meth:`_attack`."""
        x, target, seeds = self._prepare(model, images, labels, valid, seeds)
        with eval_mode(model), torch.enable_grad():
            out = self.attack_target(target, x, seeds, progress, **kwargs)
        return self._finish(out, images)

    def attack_target(
        self,
        target: 'SegmentationTarget',
        x: Tensor,
        seeds: Optional[List[int]] = None,
        progress: Optional[Callable[[str], None]] = None,
        **kwargs,
    ) -> AttackOutput:
        """Attack a prepared target: :meth:`run` without its input checks, eval
        mode and output dtype. For ensembles that run their members on the
        target they checked once (:class:`~mmseg_robust.attacks.SEA`).

        The attack keeps no state of a call (``progress`` is passed down, not
        stored), so calls may be nested or repeated.

        Args:
            target (SegmentationTarget): model view, labels and valid mask.
            x (Tensor): clean fp32 images ``(B, 3, H, W)`` in ``[0, 1]``.
            seeds (list of int, optional): one per image.
            progress (callable, optional): as in :meth:`run`.

        Returns:
            AttackOutput: as :meth:`run`, in fp32, not detached.
        """
        before = target.counter.snapshot(target.positions)
        out = self._attack(target, x, seeds, _reporter(progress), **kwargs)
        spent = PassCounter.spent(before, target.counter.snapshot(target.positions))
        return out._replace(stats=dict(out.stats or {}, **spent))

    def __call__(
        self,
        model: ModelView,
        images: Tensor,
        labels: Tensor,
        valid: Optional[Tensor] = None,
        seeds: Optional[Sequence[int]] = None,
    ) -> Tensor:
        """Adversarial images ``(B, 3, H, W)``; same as ``run(...).adv_images``."""
        return self.run(model, images, labels, valid, seeds).adv_images

    # ----------------------------------------------------------------- internals
    def _attack(
        self,
        target: SegmentationTarget,
        x: Tensor,
        seeds: Optional[List[int]],
        report: Callable[[str], None],
    ) -> AttackOutput:
        """The attack itself; ``report(text)`` passes progress to the caller."""
        raise NotImplementedError

    def _prepare(self, model, images, labels, valid, seeds):
        """Check the inputs; return fp32 images, the target and the seeds."""
        if not callable(model):
            raise TypeError(f'model must be callable, got {type(model)}')
        if (
            not isinstance(images, Tensor)
            or images.dim() != 4
            or not images.is_floating_point()
        ):
            raise ValueError(
                'images must be a float tensor (B, C, H, W) in [0, 1], got '
                f'{getattr(images, "shape", type(images))}'
            )
        b = images.shape[0]
        # Labels are usually at the image resolution, but may be at another one
        # (mmseg evaluates at the original image size): the model view then
        # returns logits at the label resolution.
        if not isinstance(labels, Tensor) or labels.dim() != 3 or labels.shape[0] != b:
            raise ValueError(
                f'labels must be a tensor (B, H, W) with B = {b}, got '
                f'{getattr(labels, "shape", type(labels))}'
            )
        h, w = labels.shape[1:]
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f'labels must be integer (long), got {labels.dtype}')
        if valid is not None and (
            not isinstance(valid, Tensor) or valid.shape != (b, h, w)
        ):
            raise ValueError(
                f'valid must be a bool tensor (B, H, W) = {(b, h, w)}, got '
                f'{getattr(valid, "shape", type(valid))}'
            )
        if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
            raise ValueError(
                f'images must be in pixel space [0, 1], got values in '
                f'[{float(images.min()):.4g}, {float(images.max()):.4g}]; attack the '
                f'un-normalised images (the model view normalises)'
            )
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            if len(seeds) != b:
                raise ValueError(
                    f'seeds must hold one int per image ({b}), got {len(seeds)}'
                )
        self.threat_model.check_size(images.shape)
        x = images.detach().float()
        labels = labels.detach().to(device=x.device, dtype=torch.long)
        if valid is not None:
            valid = valid.detach().to(device=x.device, dtype=torch.bool)
        target = SegmentationTarget(
            model, labels, valid, self.ignore_index, self.objectives()
        )
        return x, target, seeds

    @classmethod
    def _finish(cls, out: AttackOutput, images: Tensor) -> AttackOutput:
        members = None
        if out.members:
            members = {k: cls._finish(o, images) for k, o in out.members.items()}
        stats = {
            k: v.detach() if isinstance(v, Tensor) else v
            for k, v in (out.stats or {}).items()
        }
        return AttackOutput(
            out.adv_images.detach().to(images.dtype),
            None if out.adv_pred is None else out.adv_pred.detach(),
            stats,
            members,
            out.worst_member,
        )

    def _build_objective(self, loss) -> Objective:
        # The objective's own ignore_index only matters when it is called directly:
        # attacks pass it labels and the effective valid mask.
        return build_objective(loss)
