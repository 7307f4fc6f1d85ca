"""Adversarial test/val loops: the Runner glue of the robustness evaluation.

One batch flows in one direction: Runner -> :meth:`run_iter` (mmengine's ``run``
is kept) -> the :class:`~mmseg_robust.engine.ResultCache` (images done before
are not attacked again) -> data preprocessor -> pixel-space view
(:class:`~mmseg_robust.models.SegmentorPixelView`) ->
:class:`~mmseg_robust.evaluation.RobustnessEvaluator` (the attacks, per-image
records, the self-checks; no Runner) -> the cache -> output data samples
(records, the batch's flags, the adversarial examples when a hook asks) -> hooks
and :class:`~mmseg_robust.evaluation.RobustnessMetric` (aggregation and the
results file).
"""

import logging
import time
from typing import Dict, List, Optional, Sequence, Union

from mmengine.dist import get_rank, get_world_size
from mmengine.logging import print_log
from mmengine.runner import TestLoop, ValLoop

from mmseg_robust.evaluation import (
    RobustnessEvaluator,
    RobustnessMetric,
    eps_key,
    image_seed,
)
from mmseg_robust.models.cheaper_passes import CheaperPasses
from mmseg_robust.models.pixel_space import (
    SegmentorPixelView,
    ignore_index_of,
    unwrap_model,
)
from mmseg_robust.registry import LOOPS

from .checkpoint_check import CheckpointCheckHook, check_loaded_checkpoint
from .result_cache import (
    DATA_DIGESTS,
    ResultCache,
    data_files,
    data_stamp,
    describe_evaluation,
)

__all__ = ['AdversarialTestLoop', 'AdversarialValLoop', 'image_seed']


def _image_key(sample) -> str:
    meta = sample.metainfo
    for k in ('img_path', 'seg_map_path'):
        if meta.get(k):
            return str(meta[k])
    raise ValueError(
        'data samples carry no img_path: the robustness loop needs '
        'it to identify images (use mmseg datasets and PackSegInputs)'
    )


class _AdversarialEvalMixin:
    """Attack every batch with a
    :class:`~mmseg_robust.evaluation.RobustnessEvaluator` (``self.robustness``),
    cache its per-image records, feed the metric.

    Args:
        attacks (list[dict]): attack configs built from ``ATTACKS`` (without
            ``eps``: it is set from ``eps``), e.g.
            ``[dict(type='SEA', steps=300, class_weights='voc')]``.
        eps (float | list[float]): radii in /255 units; every attack runs at each.
        seed (int): seed of the random starts (per image, see
            :func:`~mmseg_robust.evaluation.image_seed`).
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
            logged once, travel in the outputs to the metric and are written to
            the results file. Default: True (test), False (val).
        data_digest (str): how the cache compares each image's data files
            (image and annotation) with those its record was computed from:
            ``'stat'`` (sizes and modification times in ns) or ``'content'``
            (BLAKE2b of the bytes); see :mod:`mmseg_robust.engine.result_cache`.
            Default: ``'stat'``.
        probes (bool | str | list | dict, optional): the opt-in probes of the
            attack outcome on the first attacked batch, ``'large_radius'``
            and/or ``'gradient_free'`` (True: both; see
            :class:`~mmseg_robust.evaluation.RobustnessEvaluator` and
            docs/flags.md). Default: None.
        speedups (str | list[str], optional): opt-in options that make the
            attack's passes cheaper, ``'channels_last'``, ``'compile'``,
            ``'bf16'`` (a list or comma-separated text; see
            :mod:`~mmseg_robust.models.cheaper_passes`). They enter the
            result cache's key. Default: None (plain fp32 passes).
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
        probes=None,
        speedups=None,
    ) -> None:
        # mmengine's TestLoop / ValLoop (attacks run in fp32)
        super().__init__(runner, dataloader, evaluator, fp16=False)
        if resume is None:
            resume = self._defaults['resume']
        if log_interval is None:
            log_interval = self._defaults['log_interval']
        if self_checks is None:
            self_checks = self._defaults['self_checks']
        # the attacks ignore the labels the decode head ignores, as training does
        self.robustness = RobustnessEvaluator(
            attacks,
            eps,
            seed=seed,
            self_checks=bool(self_checks),
            ignore_index=ignore_index_of(self.runner.model),
            probes=probes,
        )
        self.self_checks = self.robustness.self_checks
        self.attack_cfgs = self.robustness.attack_cfgs
        self.eps_list = self.robustness.eps_list
        self.seed = self.robustness.seed
        self.resume = resume
        self.log_interval = max(1, int(log_interval))
        self.cache: Optional[ResultCache] = None
        if data_digest not in DATA_DIGESTS:
            raise ValueError(
                f'data_digest must be one of {DATA_DIGESTS}, got {data_digest!r}'
            )
        self.data_digest = data_digest
        self._data_stamps: Dict[str, str] = {}
        # one instance for the whole evaluation: it compiles the segmentor once
        self.passes = CheaperPasses(speedups)

    # ------------------------------------------------------------------- start
    def _check_checkpoint(self) -> None:
        """The test loop checks the checkpoint it tests (unless the hook of
        ``tools/test.py`` does); a validation never re-checks ``load_from``:
        during a training the model is not the loaded checkpoint."""

    def _start(self) -> None:
        """Before the first batch: check the checkpoint, open the cache, tell the
        metrics what the results file records."""
        self._check_checkpoint()
        self.passes.check(unwrap_model(self.runner.model))  # bf16 off a GPU
        self._t0 = time.time()
        self._done = 0
        self._attacked = 0
        self._units_restored = 0
        self.robustness.start()
        self._logged_codes = set()
        # the visualization hook asks for the adversarial examples
        self._want_examples = any(
            getattr(h, 'needs_adv_examples', False)
            for h in getattr(self.runner, 'hooks', [])
        )
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
            {eps_key(e): built for e, built in self.robustness.attacks.items()},
            self.seed,
            self.data_digest,
            speedups=self.passes.names,
        )

    def _log_attack(self, eps: float, name: str) -> None:
        self._current = f'eps {eps_key(eps)}: {name}'
        if (self._idx + 1) % self.log_interval == 0:
            print_log(
                f'Robustness [{self._idx + 1}/{len(self.dataloader)} batches] '
                f'running {self._current}',
                logger='current',
            )

    def _log_flags(self, flags) -> None:
        """Log each flag code once (on this rank)."""
        for flag in flags:
            if flag.code in self._logged_codes:
                continue
            self._logged_codes.add(flag.code)
            level = logging.ERROR if flag.level == 'error' else logging.WARNING
            print_log(flag.text(), logger='current', level=level)

    # ------------------------------------------------------------------- iter
    def run_iter(self, idx: int, data_batch: dict) -> None:
        """Attack one batch (images found in the cache are not attacked again),
        hand the per-image records to the evaluator, call the iteration hooks.

        The outputs are the batch's data samples, each with three more fields:
        ``robustness`` (the image's record), ``robustness_flags`` (the
        self-checks' flags first found on this batch, None with the checks
        off) and ``adv_examples`` (``{eps: Example}`` when a hook asks for
        them, else None; None for images restored from the cache).
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
        """cache -> evaluator -> cache -> outputs."""
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
        flags = []
        if todo:
            model = self.runner.model
            model.eval()
            sub_batch = dict(
                inputs=[data_batch['inputs'][i] for i in todo],
                data_samples=[samples[i] for i in todo],
            )
            todo_keys = [keys[i] for i in todo]
            try:
                with self.passes.applied(unwrap_model(model)):
                    result = self.robustness.evaluate(
                        SegmentorPixelView(model, sub_batch, passes=self.passes),
                        todo_keys,
                        examples=self._want_examples,
                        saved=self._saved_units(todo_keys),
                        save=self._save_units(todo_keys),
                        progress=self._log_attack,
                    )
            finally:
                self._log_flags(self.robustness.flags)
            new = [rec.to_json() for rec in result.records]
            if self.cache is not None:
                for rec in new:
                    rec['data'] = self._data_stamps[rec['key']]
                self.cache.put(new)
            for i, rec, ex in zip(todo, new, result.examples):
                records[i] = rec
                examples[i] = ex if self._want_examples else None
            flags = result.flags
            self._attacked += len(todo)
        elif self.self_checks:
            flags = self.robustness.checks.take_batch_flags()  # e.g. build warnings
        self._done += len(keys)
        self._log_progress(idx)
        outputs = []
        for sample, record, example in zip(samples, records, examples):
            out = sample.new()
            out.set_field(record, 'robustness')
            out.set_field(list(flags) if self.self_checks else None, 'robustness_flags')
            out.set_field(example, 'adv_examples')
            outputs.append(out)
        return outputs

    def _saved_units(self, keys: List[str]):
        """``saved(eps, j)`` for the evaluator: the saved counts of attack ``j``
        at ``eps`` for every image of the batch (an interrupted run of the same
        batches), else None."""
        if self.cache is None:
            return None

        def saved(eps: float, j: int):
            units = [
                self.cache.get_unit(k, eps_key(eps), j, self._data_stamps.get(k))
                for k in keys
            ]
            if any(u is None for u in units):
                return None
            self._units_restored += 1
            return [u['counts'] for u in units]

        return saved

    def _save_units(self, keys: List[str]):
        if self.cache is None:
            return None

        def save(eps: float, j: int, units: list) -> None:
            self.cache.put_units(
                eps_key(eps), j, dict(zip(keys, units)), self._data_stamps
            )

        return save

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

    def _check_checkpoint(self) -> None:
        # tools/test.py checks with its CheckpointCheckHook: check once
        hooks = getattr(self.runner, 'hooks', [])
        if not any(isinstance(h, CheckpointCheckHook) for h in hooks):
            check_loaded_checkpoint(self.runner)


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
