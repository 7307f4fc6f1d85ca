"""Adversarial test/val loops: the Runner glue of the robustness evaluation.

One batch flows in one direction: Runner -> :meth:`run_iter` (mmengine's ``run``
is kept) -> data preprocessor -> pixel-space view
(:class:`~mmseg_robust.models.SegmentorPixelView`) -> attacks (pure torch,
:mod:`mmseg_robust.attacks`; an ensemble such as SEA reports its members' outputs
itself) -> per-image records (:func:`~mmseg_robust.evaluation.image_record`),
saved by the :class:`~mmseg_robust.engine.ResultCache` -> output data samples
(records and adversarial examples) -> hooks and
:class:`~mmseg_robust.evaluation.RobustnessMetric` (aggregation and the results
file).
"""

import contextlib
import logging
import os.path as osp
import time
import warnings
import zlib
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.logging import print_log
from mmengine.runner import TestLoop, ValLoop

from mmseg_robust.evaluation import (
    RobustnessMetric,
    counts_of_batch,
    eps_key,
    image_record,
    pixel_accuracy,
)
from mmseg_robust.evaluation.self_checks import (
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
    pre_attack_checks,
    raise_errors,
)
from mmseg_robust.models.pixel_space import SegmentorPixelView, ignore_index_of
from mmseg_robust.registry import ATTACKS, LOOPS

from .checkpoint_check import check_loaded_checkpoint
from .result_cache import (
    DATA_DIGESTS,
    ResultCache,
    data_files,
    data_stamp,
    describe_evaluation,
)

__all__ = ['AdversarialTestLoop', 'AdversarialValLoop', 'image_seed']


def image_seed(seed: int, key: str) -> int:
    """Per-image seed from the run seed and the image's file name.

    Depends on neither the rank, the batch nor the data root, so 1 and N processes
    (and reruns on another machine) start each image's attack from the same point
    (docs/algorithms.md section 1: the numbers agree up to float noise,
    bit-identical for the same batch composition).
    """
    return (int(seed) * 1_000_003 + zlib.crc32(osp.basename(key).encode())) % (2**31)


def _image_key(sample) -> str:
    meta = sample.metainfo
    for k in ('img_path', 'seg_map_path'):
        if meta.get(k):
            return str(meta[k])
    raise ValueError(
        'data samples carry no img_path: the robustness loop needs '
        'it to identify images (use mmseg datasets and PackSegInputs)'
    )


def _accuracy(counts: dict) -> float:
    """Pixel accuracy of one image's counts (0 without valid pixels)."""
    return pixel_accuracy(counts['correct'], counts['valid'])


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


def _add_counts(per_image: list, eps_name: str, counts: list) -> None:
    """Add one attack's per-image ``{name: counts}`` at ``eps_name``."""
    for rec, named in zip(per_image, counts):
        for name, c in named.items():
            if name in rec[eps_name]:
                raise ValueError(
                    f'two attacks at eps {eps_name} are named {name}: give the '
                    'attacks different settings'
                )
            rec[eps_name][name] = c


class _AdversarialEvalMixin:
    """Attack every batch, compute per-image counts, cache them, feed the metric.

    Args:
        attacks (list[dict]): attack configs built from ``ATTACKS`` (without
            ``eps``: it is set from ``eps``), e.g.
            ``[dict(type='SEA', steps=300, class_weights='voc')]``.
        eps (float | list[float]): radii in /255 units; every attack runs at each.
        seed (int): seed of the random starts (per image, see :func:`image_seed`).
        resume (bool): save per-image results under
            ``work_dir/robustness_cache/<fingerprint>/`` and skip images found
            there (an interrupted run restarted with the same command
            continues). Default: True (test), False (val: the weights change
            between validations).
        log_interval (int): log progress every this many batches. Default: 1
            (test), 10 (val).
        self_checks (bool): check the evaluation and record what makes its
            numbers untrustworthy as flags (docs/flags.md): label range on
            every attacked batch; random inference, probability outputs,
            non-finite logits/gradients, zero gradients, train mode and changing
            buffers on the first attacked batch (one extra input-gradient
            pass); after every attack, finite logits at every attacked point
            and returned images inside the ball and the pixel range; after the
            first batch's attack, a dynamic model and the recorded prediction
            (two forwards per eps); clean accuracy near chance and a worst case
            ending above clean at the end. Errors raise ``ValueError`` (before
            attacking, or after the attack that showed them); warnings are
            logged once and written to the results file. Default: True (test),
            False (val).
        data_digest (str): how the cache compares each image's data files
            (image and annotation) with those its record was computed from:
            ``'stat'`` (sizes and modification times in ns) or ``'content'``
            (BLAKE2b of the bytes); see :mod:`mmseg_robust.engine.result_cache`.
            Default: ``'stat'``.
    """

    _stage = 'test'  # the hooks' stage: 'test' or 'val'
    _defaults = dict(resume=True, log_interval=1, self_checks=True)

    def __init__(
        self,
        runner,
        dataloader,
        evaluator,
        attacks: Union[dict, Sequence[dict]],
        eps: Union[float, Sequence[float]] = 8,
        seed: int = 0,
        resume: Optional[bool] = None,
        log_interval: Optional[int] = None,
        self_checks: Optional[bool] = None,
        data_digest: str = 'stat',
    ) -> None:
        # mmengine's TestLoop / ValLoop (attacks run in fp32)
        super().__init__(runner, dataloader, evaluator, fp16=False)
        if resume is None:
            resume = self._defaults['resume']
        if log_interval is None:
            log_interval = self._defaults['log_interval']
        if self_checks is None:
            self_checks = self._defaults['self_checks']
        self.self_checks = bool(self_checks)
        self._build_warnings: List[str] = []
        if isinstance(attacks, dict):
            attacks = [attacks]
        if not attacks:
            raise ValueError(
                'the adversarial loop needs at least one attack, '
                'e.g. attacks=[dict(type="SEA")]'
            )
        eps_list = [eps] if isinstance(eps, (int, float)) else list(eps)
        if not eps_list:
            raise ValueError('eps must be a number or a non-empty list')
        self.attack_cfgs = [dict(cfg) for cfg in attacks]
        self.eps_list = [float(e) for e in eps_list]
        self.attacks = OrderedDict()  # eps key -> list of built attacks
        with self._attack_warnings(self._build_warnings):
            self._build_attacks()
        self.seed = int(seed)
        self.resume = resume
        self.log_interval = max(1, int(log_interval))
        self.cache: Optional[ResultCache] = None
        if data_digest not in DATA_DIGESTS:
            raise ValueError(
                f'data_digest must be one of {DATA_DIGESTS}, got {data_digest!r}'
            )
        self.data_digest = data_digest
        self._data_stamps: Dict[str, str] = {}

    def _build_attacks(self) -> None:
        # the attacks ignore the labels the decode head ignores, as training does
        ignore = ignore_index_of(self.runner.model)
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
            self.attacks[eps_key(e)] = built

    # ------------------------------------------------------------------- start
    def _start(self) -> None:
        """Before the first batch: check the checkpoint, open the cache, tell the
        metrics what the results file records."""
        check_loaded_checkpoint(self.runner)
        self._t0 = time.time()
        self._done = 0
        self._attacked = 0
        self._units_restored = 0
        self.cache = None
        if self.resume:
            self.cache = ResultCache.for_evaluation(
                self.runner.work_dir, self._description(), get_rank()
            )
            if len(self.cache) or self.cache.partly_done:
                print_log(
                    f'Resuming the robustness evaluation: {len(self.cache)} '
                    f'images already done, {self.cache.partly_done} partly done, '
                    f'in {self.cache.folder}',
                    logger='current',
                )
        if self._stage == 'test':
            for metric in self.evaluator.metrics:
                if isinstance(metric, RobustnessMetric):
                    metric.set_run_info(
                        work_dir=self.runner.work_dir,
                        attacks=self.attack_cfgs,
                        eps=self.eps_list,
                        checkpoint=getattr(self.runner, '_load_from', None),
                        timestamp=self.runner.timestamp,
                    )
        self._start_self_checks()

    def _description(self) -> dict:
        """Everything the cached results depend on (the cache's key; what it
        covers and what not: :func:`~mmseg_robust.engine.result_cache.
        describe_evaluation`)."""
        return describe_evaluation(
            self.runner.cfg,
            getattr(self.runner, '_load_from', None),
            self.runner.model,
            self.dataloader,
            self.attack_cfgs,
            self.attacks,
            self.seed,
            self.data_digest,
        )

    # ----------------------------------------------------------------- attack
    def _attack_batch(self, view: SegmentorPixelView, keys: List[str]) -> tuple:
        """Attack one batch: per image its record and its adversarial examples
        (``{eps: example}``, the attack with the lowest pixel accuracy)."""
        labels = view.labels
        if labels is None:
            raise ValueError(
                'the robustness evaluation needs ground truth: the '
                'test pipeline must contain LoadAnnotations'
            )
        logits, clean_pred = view.predict()
        num_classes = logits.shape[1]
        ignore = ignore_index_of(self.runner.model)
        if self.self_checks:
            self._checks_before_attack(view, keys, logits, ignore)
        clean = counts_of_batch(clean_pred, labels, num_classes, ignore)
        per_image: List[Dict[str, Dict[str, dict]]] = [OrderedDict() for _ in keys]
        examples: List[Dict[str, dict]] = [OrderedDict() for _ in keys]
        seeds = [image_seed(self.seed, k) for k in keys]
        for eps_name, attacks in self.attacks.items():
            # per image: [accuracy, attack name, adversarial image, prediction]
            worst = [[2.0, None, None, None] for _ in keys]
            restored_here = False
            for rec in per_image:
                rec[eps_name] = OrderedDict()
            for j, attack in enumerate(attacks):
                saved = self._saved_units(keys, eps_name, j)
                if saved is not None:
                    # this attack finished on this batch before an interruption
                    _add_counts(per_image, eps_name, [u['counts'] for u in saved])
                    self._units_restored += 1
                    restored_here = True
                    continue
                name = attack.name
                watch = LogitsWatch(view) if self.self_checks else None
                out = attack.run(
                    watch or view,
                    view.images,
                    labels,
                    seeds=seeds,
                    progress=lambda text, e=eps_name: self._log_attack(e, text),
                )
                if watch is not None:
                    self._check_attack_output(watch, out, name, attack, eps_name, keys)
                unit = [OrderedDict() for _ in keys]
                for member, member_out in out.by_attack(name).items():
                    counts = counts_of_batch(
                        member_out.adv_pred, labels, num_classes, ignore
                    )
                    for u, c in zip(unit, counts):
                        u[member] = c
                _add_counts(per_image, eps_name, unit)
                if self.cache is not None:
                    self.cache.put_units(
                        eps_name, j, dict(zip(keys, unit)), self._data_stamps
                    )
                # the attack's own output is its worst case over its members:
                # image i is member out.source(name, i)'s, whose counts are here
                for i, (w, u) in enumerate(zip(worst, unit)):
                    source = out.source(name, i)
                    acc = _accuracy(u[source])
                    if acc < w[0]:
                        w[:] = [acc, source, out.adv_images[i], out.adv_pred[i]]
            if restored_here:
                continue  # no example: not every attack ran at this eps
            if self.self_checks and self._checks_pending:
                self._check_returned_images(view, worst, eps_name, ignore)
            for ex, w, c in zip(examples, worst, clean):
                ex[eps_name] = dict(
                    eps=float(eps_name),
                    attack=w[1],
                    adv_acc=w[0],
                    clean_acc=_accuracy(c),
                    adv_image=w[2],
                    adv_pred=w[3],
                )
        records = [
            image_record(k, num_classes, c, a)
            for k, c, a in zip(keys, clean, per_image)
        ]
        return records, self._make_examples(view, keys, clean_pred, examples)

    def _saved_units(self, keys: List[str], eps_name: str, j: int):
        """The saved counts of attack ``j`` at ``eps_name`` for every image of
        the batch (an interrupted run of the same batches), else None."""
        if self.cache is None:
            return None
        saved = [
            self.cache.get_unit(k, eps_name, j, self._data_stamps.get(k)) for k in keys
        ]
        return None if any(u is None for u in saved) else saved

    def _make_examples(self, view, keys, clean_pred, examples) -> list:
        """numpy examples (see :func:`mmseg_robust.reporting.save_example`)."""
        # the view's images are in the channel order the network sees: RGB
        # when the preprocessor converts mmcv's BGR, BGR when it does not
        rgb = bool(getattr(view.model.data_preprocessor, 'channel_conversion', False))

        def to_hwc(img):
            img = img.detach().float().cpu()
            img = img if rgb else img.flip(0)
            return img.permute(1, 2, 0).contiguous().numpy()

        out = []
        for i, (key, per_eps) in enumerate(zip(keys, examples)):
            common = dict(
                name=osp.splitext(osp.basename(key))[0],
                image=to_hwc(view.images[i]),
                gt=view.labels[i].cpu().numpy(),
                clean_pred=clean_pred[i].cpu().numpy(),
            )
            out.append(
                OrderedDict(
                    (
                        e,
                        dict(
                            common,
                            **dict(
                                ex,
                                adv_image=to_hwc(ex['adv_image']),
                                adv_pred=ex['adv_pred'].cpu().numpy(),
                            ),
                        ),
                    )
                    for e, ex in per_eps.items()
                )
            )
        return out

    def _log_attack(self, eps_name: str, name: str) -> None:
        self._current = f'eps {eps_name}: {name}'
        if (self._idx + 1) % self.log_interval == 0:
            print_log(
                f'Robustness [{self._idx + 1}/{len(self.dataloader)} batches] '
                f'running {self._current}',
                logger='current',
            )

    # ------------------------------------------------------------------- iter
    def run_iter(self, idx: int, data_batch: dict) -> None:
        """Attack one batch (images found in the cache are not attacked again),
        hand the per-image records to the evaluator, call the iteration hooks.

        The outputs are the batch's data samples, each with two more fields:
        ``robustness`` (the image's record) and ``adv_examples`` (``{eps:
        example}``, None for images restored from the cache).
        """
        if idx == 0:
            self._start()
        self.runner.call_hook(
            f'before_{self._stage}_iter', batch_idx=idx, data_batch=data_batch
        )
        outputs = self._evaluate_iter(idx, data_batch)
        self.evaluator.process(data_samples=outputs, data_batch=data_batch)
        self.runner.call_hook(
            f'after_{self._stage}_iter',
            batch_idx=idx,
            data_batch=data_batch,
            outputs=outputs,
        )

    def _evaluate_iter(self, idx: int, data_batch: dict) -> list:
        self._idx = idx
        samples = data_batch['data_samples']
        keys = [_image_key(s) for s in samples]
        records = [None] * len(keys)
        if self.cache is not None:
            # the files this batch was read from: a record of other files
            # (rewritten in place) is not reused
            self._data_stamps = {
                k: data_stamp(data_files(s), self.data_digest)
                for k, s in zip(keys, samples)
            }
            records = [self.cache.get(k, self._data_stamps[k]) for k in keys]
        todo = [i for i, r in enumerate(records) if r is None]
        examples = [None] * len(keys)
        if todo:
            model = self.runner.model
            model.eval()
            sub_batch = dict(
                inputs=[data_batch['inputs'][i] for i in todo],
                data_samples=[samples[i] for i in todo],
            )
            view = SegmentorPixelView(model, sub_batch)
            with self._first_batch_checks(view):
                new, new_examples = self._attack_batch(view, [keys[i] for i in todo])
            if self.cache is not None:
                for rec in new:
                    rec['data'] = self._data_stamps[rec['key']]
                self.cache.put(new)
            for i, rec, ex in zip(todo, new, new_examples):
                records[i] = rec
                examples[i] = ex
            self._attacked += len(todo)
        self._done += len(keys)
        self._log_progress(idx)
        outputs = []
        for sample, record, example in zip(samples, records, examples):
            out = sample.new()
            out.set_field(record, 'robustness')
            out.set_field(example, 'adv_examples')
            outputs.append(out)
        return outputs

    # ------------------------------------------------------------ self-checks
    @staticmethod
    @contextlib.contextmanager
    def _attack_warnings(sink: List[str]):
        """Collect the messages of the warnings the attacks raise (into
        ``sink``) and raise them again afterwards, unchanged."""
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                yield
        finally:
            for w in caught:
                if 'mmseg_robust' in w.filename and 'attacks' in w.filename:
                    sink.append(str(w.message))
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def _start_self_checks(self) -> None:
        """Before the first batch: reset the flags; the metrics record them."""
        self._flags: List[Flag] = []
        self._checks_pending = self.self_checks
        self._metrics = [
            m for m in self.evaluator.metrics if isinstance(m, RobustnessMetric)
        ]
        for metric in self._metrics:
            metric.set_self_checks(self.self_checks)
        if self.self_checks:
            self._add_attack_warnings(self._build_warnings)

    def _add_flags(self, flags) -> None:
        """Log each flag code once (on this rank) and hand it to the metrics."""
        new = [f for f in flags if f and f.code not in {g.code for g in self._flags}]
        for flag in new:
            self._flags.append(flag)
            level = logging.ERROR if flag.level == 'error' else logging.WARNING
            print_log(flag.text(), logger='current', level=level)
        for metric in self._metrics:
            metric.add_flags(new)

    def _add_attack_warnings(self, messages: List[str]) -> None:
        if messages:
            unique = list(OrderedDict.fromkeys(messages))
            self._add_flags(
                [
                    Flag(
                        'attack_warning',
                        'warning',
                        'the attacks warned: ' + ' | '.join(unique),
                        'see the warning; check eps (in /255 units; confirm an '
                        "intended value with eps_units='255') and steps.",
                        dict(warnings=unique),
                    )
                ]
            )

    def _checks_before_attack(self, view, keys, logits, ignore) -> None:
        """Labels (every batch) and, on the first attacked batch, the
        pre-attack checks; errors raise before the attack."""
        flag = check_labels(view.labels, logits.shape[1], ignore, keys)
        self._add_flags([flag])
        raise_errors([flag] if flag else [])
        if not self._checks_pending:
            return
        flags = pre_attack_checks(
            view, view.images, view.labels, ignore, view.model, logits=logits
        )
        self._add_flags(flags)
        raise_errors(flags)

    @contextlib.contextmanager
    def _first_batch_checks(self, view):
        """Around the first attacked batch: buffers bitwise unchanged, eval
        mode kept, the attacks' warnings recorded."""
        if not self._checks_pending:
            yield
            return
        before = buffer_snapshot(view.model)
        messages: List[str] = []
        with self._attack_warnings(messages):
            yield
        self._checks_pending = False
        module = view.model
        self._add_flags([check_buffers(before, module), check_train_mode(module)])
        self._add_attack_warnings(messages)

    def _check_attack_output(self, watch, out, name, attack, eps_name, keys) -> None:
        """After every attack: finite logits at every attacked point and valid
        returned images (in the ball around the view's clean images and the
        pixel range, finite); errors raise before the batch's records are
        kept."""
        clean = watch.view.images
        flags = [
            check_attacked_logits(
                watch.nonfinite_forwards(), watch.forwards, name, eps_name, keys
            )
        ] + [
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
        flags = [f for f in flags if f]
        self._add_flags(flags)
        raise_errors(flags)

    def _check_returned_images(self, view, worst, eps_name, ignore) -> None:
        """On the first attacked batch, per eps: two forwards of the returned
        (worst-case) adversarial images agree and call no autograd, and the
        recomputed prediction equals the recorded one (two forwards)."""
        images = torch.stack([w[2] for w in worst])
        recorded = torch.stack([w[3] for w in worst])
        with torch.no_grad():
            first = view(images)
        second, calls = forward_calls_autograd(view, images)
        valid = view.labels != ignore
        self._add_flags(
            [
                check_dynamic_model(first, second, calls, eps_name),
                check_recorded_prediction(recorded, first, valid, eps_name),
            ]
        )

    def _log_progress(self, idx: int) -> None:
        if (idx + 1) % self.log_interval and idx + 1 != len(self.dataloader):
            return
        elapsed = time.time() - self._t0
        total = len(self.dataloader.dataset)
        # this rank's share of the images still to go
        left = max(total / get_world_size() - self._done, 0)
        eta = ''
        if self._attacked:
            secs = int(elapsed / self._attacked * left)
            eta = f', ETA {secs // 3600}:{secs % 3600 // 60:02d}:{secs % 60:02d}'
        print_log(
            f'Robustness [{idx + 1}/{len(self.dataloader)} batches] images done '
            f'on this rank: {self._done} ({self._attacked} attacked, '
            f'{self._done - self._attacked} from cache'
            + (
                f'; {self._units_restored} attacks of interrupted batches restored'
                if self._units_restored
                else ''
            )
            + f'), last attack {getattr(self, "_current", "-")}{eta}',
            logger='current',
        )


@LOOPS.register_module()
class AdversarialTestLoop(_AdversarialEvalMixin, TestLoop):
    """Test loop that evaluates robustness under attacks (SEA and single attacks).

    Select it in a config, with :class:`~mmseg_robust.evaluation.RobustnessMetric`
    as ``test_evaluator``::

        test_cfg = dict(type='AdversarialTestLoop', eps=[4, 8],
                        attacks=[dict(type='SEA', steps=300, class_weights='voc')])
        test_evaluator = dict(type='RobustnessMetric')

    or with ``tools/test.py CFG CKPT --cfg-options evaluator=SEA``.

    Args:
        runner, dataloader, evaluator: as :class:`mmengine.runner.TestLoop`.
        attacks, eps, seed, resume, log_interval, self_checks: see
            :class:`_AdversarialEvalMixin`.
    """

    _stage = 'test'


@LOOPS.register_module()
class AdversarialValLoop(_AdversarialEvalMixin, ValLoop):
    """Validation loop with attacks, e.g. to monitor robustness during training::

        val_cfg = dict(type='AdversarialValLoop', eps=4,
                       attacks=[dict(type='PGD', steps=5)], resume=False)
        val_evaluator = dict(type='RobustnessMetric', worst_case_modes=['best'])

    The model is put back in train mode by the train loop afterwards, as with
    mmengine's ``ValLoop``. ``resume`` defaults to False here: the weights change
    between validations.
    """

    _stage = 'val'
    _defaults = dict(resume=False, log_interval=10, self_checks=False)
