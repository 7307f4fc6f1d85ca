"""Runner-free robustness evaluation of one batch: clean and attacked per-image
counts, the worst-case example per image and eps, and the self-checks' flags.

:class:`RobustnessEvaluator` is what :class:`~mmseg_robust.engine.AdversarialTestLoop`
runs on every batch; a Python user calls it directly with a pixel-space view of
a model (:class:`~mmseg_robust.models.SegmentorPixelView`) and gets the same
per-image records as ``tools/test.py``::

    evaluator = RobustnessEvaluator([dict(type='SEA', steps=20)], eps=[4, 8])
    result = evaluator.evaluate(SegmentorPixelView(model, data_batch), keys)
    result.records[0].attacks[8.0]['SEA:APGD-CE'].accuracy

The records are typed (:class:`ImageCounts`, :class:`ImageRecord`, keyed by
float eps); :meth:`ImageRecord.to_json` gives the dict that the result cache
stores and :class:`~mmseg_robust.evaluation.RobustnessMetric` aggregates
(:func:`~mmseg_robust.evaluation.image_record`).

Accuracy of an image without valid pixels: every per-image accuracy here is
:attr:`ImageCounts.accuracy` (:func:`~mmseg_robust.evaluation.pixel_accuracy`):
NaN for an image whose pixels are all ignored. Such an image is left out of
every mean over images (SEA's aACC, docs/algorithms.md section 4) and of the
above-clean counts; its example is the first attack's.
"""

import contextlib
import os.path as osp
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from mmseg_robust.attacks import AttackWarning
from mmseg_robust.attacks.base import CONVERGENCE_KEYS, PASS_KEYS
from mmseg_robust.registry import ATTACKS

from .counts import RECORD_COUNT_KEYS, counts_of_batch, eps_key, pixel_accuracy
from .probes import gradient_free_probe, large_radius_probe, probe_settings
from .self_checks import (
    Flag,
    LogitsWatch,
    buffer_snapshot,
    check_adversarial_images,
    check_attacked_logits,
    check_buffers,
    check_dynamic_model,
    check_labels,
    check_recorded_prediction,
    check_train_mode,
    forward_calls_autograd,
    merge_flags,
    pre_attack_checks,
    raise_errors,
)

__all__ = [
    'BatchResult',
    'Example',
    'ImageCounts',
    'ImageRecord',
    'RobustnessEvaluator',
    'SelfCheckRun',
    'attack_warnings',
    'eps_key',
    'image_seed',
]


def image_seed(seed: int, key: str) -> int:
    """Per-image seed from the run seed and the image's file name.

    Depends on neither the rank, the batch nor the data root, so 1 and N processes
    (and reruns on another machine) start each image's attack from the same point
    (docs/algorithms.md section 1: the numbers agree up to float noise,
    bit-identical for the same batch composition).
    """
    return (int(seed) * 1_000_003 + zlib.crc32(osp.basename(key).encode())) % (2**31)


# ------------------------------------------------------------------ records
@dataclass
class ImageCounts:
    """One image's counts of one prediction (mmseg's ``IoUMetric`` conventions,
    :func:`~mmseg_robust.evaluation.per_image_counts`).

    Attributes:
        intersect, union, label_area (list[int]): per class, length K.
        correct (int): valid pixels predicted correctly.
        valid (int): valid (not ignored) pixels.
        passes (int, optional): the forward+backward passes the attack spent on
            the image (docs/algorithms.md section 3.6); None for the clean
            prediction and for records written before the pass accounting.
        forwards (int, optional): the forward-only passes it spent.
        late_gain (int, optional): APGD runs: the pixels the returned point
            gained (became correct -> wrong) in the last tenth of the run's
            iterations (docs/flags.md, ``attack_unconverged``); None for
            other attacks.
    """

    intersect: List[int]
    union: List[int]
    label_area: List[int]
    correct: int
    valid: int
    # the budget is not part of the prediction's counts: not compared
    passes: Optional[int] = field(default=None, compare=False)
    forwards: Optional[int] = field(default=None, compare=False)
    late_gain: Optional[int] = field(default=None, compare=False)

    @property
    def accuracy(self) -> float:
        """Pixel accuracy ``correct / valid``; NaN without valid pixels (the
        one per-image accuracy of the evaluation, see the module docstring)."""
        return pixel_accuracy(self.correct, self.valid)

    @classmethod
    def of_batch(
        cls, pred: Tensor, label: Tensor, num_classes: int, ignore_index: int
    ) -> List['ImageCounts']:
        """The counts of every image of a ``(B, H, W)`` prediction."""
        return [
            cls.from_json(c)
            for c in counts_of_batch(pred, label, num_classes, ignore_index)
        ]

    def to_json(self) -> dict:
        out = dict(
            intersect=list(self.intersect),
            union=list(self.union),
            label_area=list(self.label_area),
            correct=int(self.correct),
            valid=int(self.valid),
        )
        # the budget only where it was counted: older readers see old records
        for key in PASS_KEYS + CONVERGENCE_KEYS:
            if getattr(self, key) is not None:
                out[key] = int(getattr(self, key))
        return out

    @classmethod
    def from_json(cls, data: dict) -> 'ImageCounts':
        return cls(
            *(list(data[k]) for k in RECORD_COUNT_KEYS),
            correct=int(data['correct']),
            valid=int(data['valid']),
            **{
                k: int(data[k])
                for k in PASS_KEYS + CONVERGENCE_KEYS
                if data.get(k) is not None
            },
        )


@dataclass
class ImageRecord:
    """One image's counts: clean and per eps (float, /255) and attack name.

    Attributes:
        key (str): the image's path (``img_path``).
        num_classes (int): K.
        clean (ImageCounts): of the clean prediction.
        attacks (dict): ``{eps: {attack name: ImageCounts}}`` in attack order.
    """

    key: str
    num_classes: int
    clean: ImageCounts
    attacks: Dict[float, Dict[str, ImageCounts]] = field(default_factory=OrderedDict)

    def to_json(self) -> dict:
        """The record as the cache and :class:`RobustnessMetric` read it
        (:func:`~mmseg_robust.evaluation.image_record`: eps as strings)."""
        return dict(
            key=self.key,
            num_classes=self.num_classes,
            clean=self.clean.to_json(),
            attacks=OrderedDict(
                (
                    eps_key(e),
                    OrderedDict((n, c.to_json()) for n, c in named.items()),
                )
                for e, named in self.attacks.items()
            ),
        )

    @classmethod
    def from_json(cls, data: dict) -> 'ImageRecord':
        return cls(
            key=data['key'],
            num_classes=int(data['num_classes']),
            clean=ImageCounts.from_json(data['clean']),
            attacks=OrderedDict(
                (
                    float(e),
                    OrderedDict(
                        (n, ImageCounts.from_json(c)) for n, c in named.items()
                    ),
                )
                for e, named in data['attacks'].items()
            ),
        )


class _WorstCase(NamedTuple):
    """One image's attack output with the lowest pixel accuracy at one eps."""

    attack: str
    adv_acc: float
    adv_image: Tensor
    adv_pred: Tensor


@dataclass
class Example:
    """The worst-case adversarial example of one image at one eps: the output of
    the attack with the lowest pixel accuracy (SEA's worst case per image).
    Tensors as the attack returned them; :meth:`to_numpy` makes the arrays of
    :func:`mmseg_robust.reporting.save_example`.

    Attributes:
        key (str): the image's path.
        eps (float): radius (/255).
        attack (str): the name of the attack (ensemble member) it comes from.
        clean_acc, adv_acc (float): pixel accuracy of the clean and the
            adversarial prediction.
        image, adv_image (Tensor): ``(3, H, W)`` in [0, 1], in the channel order
            the network sees (``rgb`` tells which).
        gt, clean_pred, adv_pred (Tensor): ``(H, W)`` class indices.
        rgb (bool): the images are RGB (else BGR).
    """

    key: str
    eps: float
    attack: str
    clean_acc: float
    adv_acc: float
    image: Tensor
    adv_image: Tensor
    gt: Tensor
    clean_pred: Tensor
    adv_pred: Tensor
    rgb: bool = True

    def to_numpy(self) -> dict:
        """The example as :func:`mmseg_robust.reporting.save_example` takes it
        (images ``(H, W, 3)`` RGB float arrays)."""

        def to_hwc(img):
            img = img.detach().float().cpu()
            img = img if self.rgb else img.flip(0)
            return img.permute(1, 2, 0).contiguous().numpy()

        return dict(
            name=osp.splitext(osp.basename(self.key))[0],
            image=to_hwc(self.image),
            gt=self.gt.cpu().numpy(),
            clean_pred=self.clean_pred.cpu().numpy(),
            eps=float(self.eps),
            attack=self.attack,
            adv_acc=self.adv_acc,
            clean_acc=self.clean_acc,
            adv_image=to_hwc(self.adv_image),
            adv_pred=self.adv_pred.cpu().numpy(),
        )


@dataclass
class BatchResult:
    """What :meth:`RobustnessEvaluator.evaluate` returns for one batch.

    Attributes:
        records (list[ImageRecord]): one per image, in batch order.
        examples (list[dict]): per image ``{eps: Example}`` (empty unless asked
            for; an eps where some attack was restored from saved counts has
            none: not every attack ran there).
        flags (list[Flag]): the self-checks' flags first found on this batch
            (one per code over the evaluation).
    """

    records: List[ImageRecord]
    examples: List[Dict[float, Example]]
    flags: List[Flag]


# ------------------------------------------------------------- self-checks
@contextlib.contextmanager
def attack_warnings(sink: List[str]):
    """Collect the messages of the warnings the attacks raise (their category
    :class:`~mmseg_robust.attacks.AttackWarning`, into ``sink``) and raise every
    caught warning again afterwards, unchanged."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            yield
    finally:
        for w in caught:
            if issubclass(w.category, AttackWarning):
                sink.append(str(w.message))
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _attack_warning_flag(messages: Sequence[str]) -> Optional[Flag]:
    if not messages:
        return None
    unique = list(OrderedDict.fromkeys(messages))
    return Flag(
        'attack_warning',
        'warning',
        'the attacks warned: ' + ' | '.join(unique),
        'see the warning; check eps (in /255 units; confirm an intended value with '
        "eps_units='255') and steps.",
        dict(warnings=unique),
    )


class SelfCheckRun:
    """The self-checks of one evaluation (docs/flags.md): which flags were
    found (one per code), whether the first attacked batch is still to come."""

    def __init__(self, first_batch_pending: bool = True) -> None:
        self.flags: List[Flag] = []
        self.pending = first_batch_pending
        self._batch: List[Flag] = []

    def add(self, flags) -> None:
        """Record flags (one per code); errors among them raise."""
        flags = [f for f in flags if f]
        known = {f.code for f in self.flags}
        new = [f for f in flags if f.code not in known]
        self.flags = merge_flags(self.flags, new)
        self._batch = merge_flags(self._batch, new)
        raise_errors(flags)

    def take_batch_flags(self) -> List[Flag]:
        """The flags first found since the last call."""
        out, self._batch = self._batch, []
        return out

    def before_attack(self, view, keys, logits, ignore) -> None:
        """Labels (every batch) and, on the first attacked batch, the
        pre-attack checks; errors raise before the attack."""
        self.add([check_labels(view.labels, logits.shape[1], ignore, keys)])
        if self.pending:
            self.add(
                pre_attack_checks(
                    view, view.images, view.labels, ignore, view.model, logits=logits
                )
            )

    @contextlib.contextmanager
    def first_batch(self, view):
        """Around the first attacked batch: buffers bitwise unchanged, eval mode
        kept, the attacks' warnings recorded."""
        if not self.pending:
            yield
            return
        before = buffer_snapshot(view.model)
        messages: List[str] = []
        with attack_warnings(messages):
            yield
        self.pending = False
        module = view.model
        self.add(
            [
                check_buffers(before, module),
                check_train_mode(module),
                _attack_warning_flag(messages),
            ]
        )

    def after_attack(self, watch, out, name, attack, eps_name, keys) -> None:
        """After every attack: finite logits at every attacked point and valid
        returned images (in the ball around the view's clean images and the
        pixel range, finite); errors raise before the batch's records are
        kept."""
        clean = watch.view.images
        self.add(
            [
                check_attacked_logits(
                    watch.nonfinite_forwards(), watch.forwards, name, eps_name, keys
                )
            ]
            + [
                check_adversarial_images(
                    member_out.adv_images,
                    clean,
                    attack.threat_model.radius,
                    attack.norm,
                    member,
                    eps_name,
                )
                for member, member_out in out.by_attack(name).items()
            ]
        )

    def returned_images(self, view, images, recorded, eps_name, ignore) -> None:
        """On the first attacked batch, per eps: two forwards of the returned
        (worst-case) adversarial images agree and call no autograd, and the
        recomputed prediction equals the recorded one."""
        with torch.no_grad():
            first = view(images)
        second, calls = forward_calls_autograd(view, images)
        valid = view.labels != ignore
        self.add(
            [
                check_dynamic_model(first, second, calls, eps_name),
                check_recorded_prediction(recorded, first, valid, eps_name),
            ]
        )


# --------------------------------------------------------------- evaluator
#: ``saved(eps, j)``: the saved per-image ``{name: counts dict}`` of attack
#: ``j`` at ``eps`` for every image of the batch, or None
SavedUnits = Callable[[float, int], Optional[List[Dict[str, dict]]]]
#: ``save(eps, j, units)``: keep attack ``j``'s per-image ``{name: counts dict}``
SaveUnits = Callable[[float, int, List[Dict[str, dict]]], None]


class RobustnessEvaluator:
    """Attack a batch at every eps with every attack; per image its clean and
    attacked counts, its worst-case example and the self-checks' flags.

    Needs no Runner: the input is a pixel-space view of the model (a callable
    from ``(B, 3, H, W)`` images in [0, 1] to logits with ``images``,
    ``labels``, ``predict()`` and ``model``, as
    :class:`~mmseg_robust.models.SegmentorPixelView`).

    Args:
        attacks (dict | list[dict]): attack configs built from ``ATTACKS``
            (without ``eps``: it is set from ``eps``), e.g.
            ``[dict(type='SEA', steps=300, class_weights='voc')]``.
        eps (float | list[float]): radii in /255 units; every attack runs at each.
        seed (int): seed of the random starts (per image, :func:`image_seed`).
        self_checks (bool): run the self-checks (docs/flags.md; what runs when:
            :class:`~mmseg_robust.engine.AdversarialTestLoop`). Error flags raise
            :class:`~mmseg_robust.evaluation.SelfCheckError`. Default: True.
        ignore_index (int): the label the decode head ignores (the attacks
            ignore it too): ``ignore_index_of(model)``
            (:mod:`mmseg_robust.models.pixel_space`). Default: 255.
        probes (bool | str | list | dict, optional): the opt-in probes of the
            attack outcome, run on the first attacked batch
            (:mod:`~mmseg_robust.evaluation.probes`, docs/flags.md):
            ``'large_radius'`` (APGD-CE at 4 x the largest eps must reach
            near-0 accuracy), ``'gradient_free'`` (the Square Attack on 4
            images must not beat the white-box worst case), both (True), or
            ``{name: {setting: value}}``. They need ``self_checks``.
            Default: None.

    Raises:
        ValueError: without attacks or eps, with ``eps`` or another
            ``ignore_index`` in an attack config, or when two attacks would
            record their results under one name.

    Example:
        >>> ev = RobustnessEvaluator([dict(type='PGD', steps=10)], eps=8)
        >>> result = ev.evaluate(SegmentorPixelView(model, batch), keys)
        >>> result.records[0].attacks[8.0]['PGD-CE'].accuracy
    """

    def __init__(
        self,
        attacks: Union[dict, Sequence[dict]],
        eps: Union[float, Sequence[float]] = 8,
        seed: int = 0,
        self_checks: bool = True,
        ignore_index: int = 255,
        probes=None,
    ) -> None:
        self.probes = probe_settings(probes)
        if self.probes and not self_checks:
            raise ValueError(
                f'the probes {sorted(self.probes)} are self-checks: set '
                'self_checks=True (evaluator.self_checks) or drop the probes'
            )
        if isinstance(attacks, dict):
            attacks = [attacks]
        if not attacks:
            raise ValueError(
                'the robustness evaluation needs at least one attack, '
                'e.g. attacks=[dict(type="SEA")]'
            )
        eps_list = [eps] if isinstance(eps, (int, float)) else list(eps)
        if not eps_list:
            raise ValueError('eps must be a number or a non-empty list')
        self.attack_cfgs = [dict(cfg) for cfg in attacks]
        self.eps_list = [float(e) for e in eps_list]
        self.seed = int(seed)
        self.self_checks = bool(self_checks)
        self.ignore_index = int(ignore_index)
        self._build_warnings: List[str] = []
        with attack_warnings(self._build_warnings):
            self.attacks = self._build_attacks()
        self.start()

    def _build_attacks(self) -> Dict[float, list]:
        ignore = self.ignore_index
        built_at = OrderedDict()
        for e in self.eps_list:
            built = []
            for cfg in self.attack_cfgs:
                cfg = dict(cfg)
                if 'eps' in cfg:
                    raise ValueError(
                        f'set eps on the loop (eps={self.eps_list}), not in the '
                        f'attack config {cfg}'
                    )
                if cfg.get('ignore_index', ignore) != ignore:
                    raise ValueError(
                        f'the attack config {cfg} sets ignore_index='
                        f'{cfg["ignore_index"]} but the decode head ignores '
                        f'{ignore}: drop ignore_index from the attack (the loop '
                        "passes the head's)"
                    )
                cfg['eps'] = e
                cfg['ignore_index'] = ignore
                built.append(ATTACKS.build(cfg))
            _check_record_names(built, eps_key(e))
            built_at[e] = built
        return built_at

    def start(self) -> None:
        """Begin an evaluation: no flags yet, the first-batch checks pending
        (the constructor calls it; call it again to evaluate anew)."""
        self.checks = SelfCheckRun(first_batch_pending=self.self_checks)
        if self.self_checks:
            self.checks.add([_attack_warning_flag(self._build_warnings)])

    @property
    def flags(self) -> List[Flag]:
        """Every flag found since :meth:`start` (one per code)."""
        return list(self.checks.flags)

    def evaluate(
        self,
        view,
        keys: Sequence[str],
        examples: bool = False,
        saved: Optional[SavedUnits] = None,
        save: Optional[SaveUnits] = None,
        progress: Optional[Callable[[float, str], None]] = None,
    ) -> BatchResult:
        """Attack one batch.

        Args:
            view: the pixel-space view of the model on the batch (its
                ``images`` ``(B, 3, H, W)`` in [0, 1] and ``labels``).
            keys (sequence of str): per image its path (names the records and
                seeds its random starts, :func:`image_seed`).
            examples (bool): return the worst-case example of every image and
                eps (:class:`Example`). Default: False.
            saved (callable, optional): ``saved(eps, j)`` gives the counts of
                attack ``j`` at ``eps`` an interrupted run saved for this batch
                (per image ``{name: counts dict}``), or None; such an attack is
                not run again.
            save (callable, optional): ``save(eps, j, units)`` is called after
                attack ``j`` at ``eps`` with its per-image ``{name: counts
                dict}``.
            progress (callable, optional): ``progress(eps, text)`` while
                attacking.

        Returns:
            BatchResult: records, examples and the flags found on this batch.
        """
        labels = view.labels
        if labels is None:
            raise ValueError(
                'the robustness evaluation needs ground truth: the '
                'test pipeline must contain LoadAnnotations'
            )
        keys = list(keys)
        ignore = self.ignore_index
        checks = self.checks if self.self_checks else None
        logits, clean_pred = view.predict()
        num_classes = logits.shape[1]
        with checks.first_batch(view) if checks else contextlib.nullcontext():
            if checks:
                checks.before_attack(view, keys, logits, ignore)
            pending = bool(checks and checks.pending)
            clean = ImageCounts.of_batch(clean_pred, labels, num_classes, ignore)
            records = [ImageRecord(k, num_classes, c) for k, c in zip(keys, clean)]
            found: List[Dict[float, Example]] = [OrderedDict() for _ in keys]
            seeds = [image_seed(self.seed, k) for k in keys]
            for e, attacks in self.attacks.items():
                eps_name = eps_key(e)
                at_eps = [OrderedDict() for _ in keys]
                for rec, named in zip(records, at_eps):
                    rec.attacks[e] = named
                worst = self._attack_at(
                    view,
                    keys,
                    seeds,
                    e,
                    attacks,
                    num_classes,
                    at_eps,
                    checks,
                    saved,
                    save,
                    progress,
                )
                if worst is None:
                    continue  # no example: not every attack ran at this eps
                if pending:
                    checks.returned_images(
                        view,
                        torch.stack([w.adv_image for w in worst]),
                        torch.stack([w.adv_pred for w in worst]),
                        eps_name,
                        ignore,
                    )
                    if 'gradient_free' in self.probes:
                        checks.add(
                            [self._gradient_free_probe(view, keys, seeds, e, worst)]
                        )
                if examples:
                    rgb = _is_rgb(view)
                    for i, w in enumerate(worst):
                        found[i][e] = Example(
                            key=keys[i],
                            eps=e,
                            attack=w.attack,
                            clean_acc=clean[i].accuracy,
                            adv_acc=w.adv_acc,
                            image=view.images[i],
                            adv_image=w.adv_image,
                            gt=labels[i],
                            clean_pred=clean_pred[i],
                            adv_pred=w.adv_pred,
                            rgb=rgb,
                        )
            if pending and 'large_radius' in self.probes:
                settings = self.probes['large_radius']
                flag, _ = large_radius_probe(
                    view,
                    view.images,
                    labels,
                    None,
                    seeds,
                    max(self.eps_list),
                    norm=self.attacks[self.eps_list[0]][0].norm,
                    ignore_index=ignore,
                    **settings,
                )
                checks.add([flag])
        flags = checks.take_batch_flags() if checks else []
        return BatchResult(records, found, flags)

    def _gradient_free_probe(self, view, keys, seeds, e, worst) -> Optional[Flag]:
        """The Square Attack at ``e`` on the first images of the batch against
        their white-box worst case (:func:`~mmseg_robust.evaluation.probes.
        gradient_free_probe`); L-inf evaluations only."""
        if self.attacks[e][0].norm != 'Linf':
            return None
        settings = dict(self.probes['gradient_free'])
        n = max(1, int(settings.pop('images')))
        flag, _ = gradient_free_probe(
            view,
            view.images[:n],
            view.labels[:n],
            None,
            seeds[:n],
            e,
            [100.0 * w.adv_acc for w in worst[:n]],
            keys[:n],
            ignore_index=self.ignore_index,
            **settings,
        )
        return flag

    def _attack_at(
        self,
        view,
        keys,
        seeds,
        e,
        attacks,
        num_classes,
        at_eps,
        checks,
        saved,
        save,
        progress,
    ):
        """Run (or restore) every attack at ``e`` into ``at_eps`` (per image
        ``{name: ImageCounts}``); per image the :class:`_WorstCase` of the
        attack with the lowest accuracy, or None when some attack was
        restored."""
        labels = view.labels
        eps_name = eps_key(e)
        worst: List[Optional[_WorstCase]] = [None for _ in keys]
        restored = False
        for j, attack in enumerate(attacks):
            units = saved(e, j) if saved is not None else None
            if units is not None:
                # this attack finished on this batch before an interruption
                _add_counts(
                    at_eps,
                    eps_name,
                    [
                        OrderedDict((n, ImageCounts.from_json(c)) for n, c in u.items())
                        for u in units
                    ],
                )
                restored = True
                continue
            name = attack.name
            watch = LogitsWatch(view) if checks else None
            out = attack.run(
                watch or view,
                view.images,
                labels,
                seeds=seeds,
                progress=None if progress is None else (lambda t: progress(e, t)),
            )
            if checks:
                checks.after_attack(watch, out, name, attack, eps_name, keys)
            unit = [OrderedDict() for _ in keys]
            for member, member_out in out.by_attack(name).items():
                counts = ImageCounts.of_batch(
                    member_out.adv_pred, labels, num_classes, self.ignore_index
                )
                budget = _budget(member_out.stats, len(counts))
                for i, (u, c) in enumerate(zip(unit, counts)):
                    for key, values in budget.items():
                        setattr(c, key, values[i])
                    u[member] = c
            _add_counts(at_eps, eps_name, unit)
            if save is not None:
                save(e, j, [{n: c.to_json() for n, c in u.items()} for u in unit])
            # the attack's output is its worst case over its members: image i
            # is member out.source(name, i)'s, whose counts are in the unit
            for i, u in enumerate(unit):
                source = out.source(name, i)
                acc = u[source].accuracy
                # the lowest accuracy wins; an image without valid pixels (NaN)
                # keeps the first attack's
                if worst[i] is None or acc < worst[i].adv_acc:
                    worst[i] = _WorstCase(
                        source, acc, out.adv_images[i], out.adv_pred[i]
                    )
        return None if restored else worst


def _budget(stats: Optional[dict], batch_size: int) -> Dict[str, List[int]]:
    """The per-image pass counts and APGD's late gain of an attack output's
    ``stats`` (:data:`~mmseg_robust.attacks.base.PASS_KEYS`,
    :data:`~mmseg_robust.attacks.base.CONVERGENCE_KEYS`), as lists of ints;
    the keys an output does not carry are left out."""
    out = {}
    for key in PASS_KEYS + CONVERGENCE_KEYS:
        values = (stats or {}).get(key)
        if isinstance(values, Tensor) and values.shape == (batch_size,):
            out[key] = [int(v) for v in values.tolist()]
    return out


def _is_rgb(view) -> bool:
    """The view's images are in the channel order the network sees: RGB when
    the preprocessor converts mmcv's BGR, BGR when it does not."""
    model = getattr(view, 'model', None)
    return bool(
        getattr(getattr(model, 'data_preprocessor', None), 'channel_conversion', False)
    )


def _check_record_names(attacks: list, eps_name: str) -> None:
    """Refuse two attacks whose results would be recorded under one name."""
    seen = {}
    for attack in attacks:
        for name in attack.record_names():
            if name in seen:
                raise ValueError(
                    f'two attacks at eps {eps_name} record their results as '
                    f'{name!r} ({seen[name]!r} and {attack!r}): results are '
                    f'named by attack, give one of them another name with '
                    f"name='...' in its config (ensembles: a name prefixes "
                    f'their members)'
                )
            seen[name] = attack


def _add_counts(at_eps: list, eps_name: str, units: list) -> None:
    """Add one attack's per-image ``{name: ImageCounts}`` to ``at_eps``."""
    for named, unit in zip(at_eps, units):
        for name, c in unit.items():
            if name in named:
                raise ValueError(
                    f'two attacks at eps {eps_name} are named {name}: give the '
                    'attacks different settings'
                )
            named[name] = c
