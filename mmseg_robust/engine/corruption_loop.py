"""The common-corruption test loop (docs/algorithms.md section 8).

``tools/test.py CFG CKPT --cfg-options evaluator=Corruptions`` runs it: one
clean pass over the test set, then one pass per corruption x severity, each
image corrupted as loaded (:class:`~mmseg_robust.datasets.Corrupt` right after
``LoadImageFromFile``) and then put through the config's own test pipeline and
``model.test_step``, as ``tools/test.py`` would. Each image's counts of each pass
are saved as they come (:class:`~mmseg_robust.engine.ResultCache`, a pass of
an image is one unit), so an interrupted run continues where it stopped; the
pooled counts go to :class:`~mmseg_robust.evaluation.CorruptionMetric`.

Images are split over the ranks as ``rank, rank + world, ...`` and the counts
are integers summed per pass, so the numbers do not depend on the process
count, the batch size or the order of the passes.
"""

import time
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmengine.dataset import Compose
from mmengine.dist import get_rank, get_world_size
from mmengine.logging import print_log
from mmengine.runner import TestLoop

from mmseg_robust.datasets.corruptions import (
    corruption_library_versions,
    corruption_package,
    resolve_corruptions,
    resolve_severities,
    with_corruption,
)
from mmseg_robust.evaluation.counts import RECORD_COUNT_KEYS, counts_of_batch
from mmseg_robust.models.pixel_space import ignore_index_of, unwrap_model
from mmseg_robust.registry import LOOPS

from .checkpoint_check import CheckpointCheckHook, check_loaded_checkpoint
from .result_cache import (
    DATA_DIGESTS,
    ResultCache,
    data_files,
    data_stamp,
    describe_model_and_data,
)

__all__ = ['CLEAN', 'CorruptionTestLoop', 'unit_name']

#: The clean pass, as a (corruption, severity) unit.
CLEAN = ('clean', 0)


def unit_name(unit: Tuple[str, int]) -> str:
    """``'clean'`` or ``'<corruption>/<severity>'``: a pass's key in the
    metric's counts and in the flat metrics."""
    return 'clean' if unit == CLEAN else f'{unit[0]}/{unit[1]}'


class _PassDataset(torch.utils.data.Dataset):
    """The images ``indices`` of ``dataset`` through ``pipeline`` (the
    dataset's own transforms with the corruption after the image loading)."""

    def __init__(self, dataset, indices: Sequence[int], pipeline) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.pipeline(self.dataset.get_data_info(self.indices[i]))


def _pass_pipeline(dataset, unit: Tuple[str, int], seed: int):
    """The dataset's built transforms, with ``Corrupt`` after the first image
    loading transform (none for the clean pass)."""
    transforms = list(getattr(getattr(dataset, 'pipeline', None), 'transforms', []))
    if not transforms or not hasattr(dataset, 'get_data_info'):
        raise ValueError(
            'the corruption evaluation needs an mmseg dataset with a pipeline '
            f'(got {type(dataset).__name__}); dataset wrappers are not supported'
        )
    if unit == CLEAN:
        return Compose(transforms)
    return Compose(with_corruption(transforms, unit[0], unit[1], seed))


def _num_classes(model) -> int:
    head = getattr(unwrap_model(model), 'decode_head', None)
    if isinstance(head, (list, tuple, torch.nn.ModuleList)):
        head = head[-1]
    num = getattr(head, 'num_classes', None)
    if num is None:
        raise ValueError(
            'the corruption evaluation needs model.decode_head.num_classes '
            '(an mmseg segmentor)'
        )
    return int(num)


@LOOPS.register_module()
class CorruptionTestLoop(TestLoop):
    """Test loop of the common-corruption evaluation.

    Select it with ``tools/test.py CFG CKPT --cfg-options evaluator=Corruptions``
    (``configs/_base_/evaluators/corruptions.py``), or in a config::

        test_cfg = dict(type='CorruptionTestLoop', corruptions='benchmark',
                        severities=[1, 2, 3, 4, 5])
        test_evaluator = dict(type='CorruptionMetric')

    Args:
        runner, dataloader, evaluator: as :class:`mmengine.runner.TestLoop`.
        corruptions (str | list[str]): ``'benchmark'`` (the 15 of the
            benchmark), ``'all'`` (19), a category (``'noise'``, ``'blur'``,
            ``'weather'``, ``'digital'``, ``'holdout'``) or names
            (:func:`~mmseg_robust.datasets.resolve_corruptions`).
        severities (int | list[int]): in 1..5. Default: all five.
        seed (int): seed of the corruptions (per image, corruption and
            severity: :func:`~mmseg_robust.datasets.corruption_seed`).
        resume (bool): save each image's counts of each pass under
            ``work_dir/robustness_cache/<fingerprint>/`` and skip the passes of
            images found there. Default: True.
        log_interval (int): log progress every this many batches (and at the
            end of every pass). Default: 50.
        data_digest (str): how the cache compares each image's files,
            ``'stat'`` or ``'content'`` (see
            :mod:`mmseg_robust.engine.result_cache`). Default: ``'stat'``.
        fp16 (bool): run the model under autocast, as mmengine's TestLoop.
            Default: False.
    """

    def __init__(
        self,
        runner,
        dataloader,
        evaluator,
        corruptions: Union[str, Sequence[str]] = 'benchmark',
        severities: Union[int, Sequence[int]] = (1, 2, 3, 4, 5),
        seed: int = 0,
        resume: bool = True,
        log_interval: int = 50,
        data_digest: str = 'stat',
        fp16: bool = False,
    ) -> None:
        super().__init__(runner, dataloader, evaluator, fp16=fp16)
        self.corruptions = resolve_corruptions(corruptions)
        self.severities = resolve_severities(severities)
        corruption_package()  # the extra's error before any work
        self.seed = int(seed)
        self.resume = bool(resume)
        self.log_interval = max(1, int(log_interval))
        if data_digest not in DATA_DIGESTS:
            raise ValueError(
                f'data_digest must be one of {DATA_DIGESTS}, got {data_digest!r}'
            )
        self.data_digest = data_digest
        self.units: List[Tuple[str, int]] = [CLEAN] + [
            (c, s) for c in self.corruptions for s in self.severities
        ]
        self.cache: Optional[ResultCache] = None

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        """All passes, then the metric (every rank's pooled counts)."""
        self.runner.call_hook('before_test')
        self.runner.call_hook('before_test_epoch')
        hooks = getattr(self.runner, 'hooks', [])
        if not any(isinstance(h, CheckpointCheckHook) for h in hooks):
            check_loaded_checkpoint(self.runner)
        self.runner.model.eval()
        dataset = self.dataloader.dataset
        rank, world = get_rank(), get_world_size()
        indices = list(range(rank, len(dataset), world))
        infos = [dataset.get_data_info(i) for i in indices]
        keys = [str(info['img_path']) for info in infos]
        stamps = {
            k: data_stamp(data_files(i), self.data_digest) for k, i in zip(keys, infos)
        }
        libraries = corruption_library_versions()
        self._open_cache(libraries)
        self._set_run_info(libraries)
        num_classes = _num_classes(self.runner.model)
        ignore_index = ignore_index_of(self.runner.model)
        # per pass: the restored images' counts pooled, the images still to do
        pools = {u: _Pool(num_classes) for u in self.units}
        todo = {u: [] for u in self.units}
        for unit in self.units:
            for pos, key in enumerate(keys):
                counts = None
                if self.cache is not None:
                    counts = self.cache.get_corruption_unit(
                        key, *unit, data=stamps[key]
                    )
                if counts is None:
                    todo[unit].append(pos)
                else:
                    pools[unit].add(counts)
        self._progress_start(len(keys), sum(len(t) for t in todo.values()))
        totals = {}
        for u_idx, unit in enumerate(self.units):
            pool = pools[unit]
            if todo[unit]:
                self._run_pass(
                    unit,
                    u_idx,
                    dataset,
                    indices,
                    keys,
                    stamps,
                    todo[unit],
                    pool,
                    num_classes,
                    ignore_index,
                )
            totals[unit_name(unit)] = pool.to_json()
        self.evaluator.process(
            data_samples=[dict(corruption_counts=totals, num_images=len(keys))]
        )
        metrics = self.evaluator.evaluate(world)
        self.runner.call_hook('after_test_epoch', metrics=metrics)
        self.runner.call_hook('after_test')
        return metrics

    def _open_cache(self, libraries: dict) -> None:
        self.cache = None
        if not self.resume:
            return
        description = describe_model_and_data(
            self.runner.cfg,
            getattr(self.runner, '_load_from', None),
            self.runner.model,
            self.data_digest,
        )
        description.update(
            evaluation='corruptions',
            seed=self.seed,
            corruption_libraries=libraries,
        )
        self.cache = ResultCache.for_evaluation(
            self.runner.work_dir, description, get_rank()
        )

    def _set_run_info(self, libraries: dict) -> None:
        from mmseg_robust.evaluation.corruption_metric import CorruptionMetric

        for metric in self.evaluator.metrics:
            if isinstance(metric, CorruptionMetric):
                metric.set_run_info(
                    work_dir=self.runner.work_dir,
                    corruptions=self.corruptions,
                    severities=self.severities,
                    seed=self.seed,
                    checkpoint=getattr(self.runner, '_load_from', None),
                    timestamp=self.runner.timestamp,
                    libraries=libraries,
                )

    def _run_pass(
        self,
        unit,
        u_idx,
        dataset,
        indices,
        keys,
        stamps,
        todo: List[int],
        pool: '_Pool',
        num_classes: int,
        ignore_index: int,
    ) -> None:
        """One pass over the images ``todo`` (positions in ``indices``)."""
        loader = torch.utils.data.DataLoader(
            _PassDataset(
                dataset,
                [indices[p] for p in todo],
                _pass_pipeline(dataset, unit, self.seed),
            ),
            batch_size=self.dataloader.batch_size or 1,
            num_workers=self.dataloader.num_workers,
            collate_fn=self.dataloader.collate_fn,
            shuffle=False,
            pin_memory=getattr(self.dataloader, 'pin_memory', False),
        )
        position = iter(todo)
        for b_idx, batch in enumerate(loader):
            with torch.no_grad(), torch.autocast(
                device_type=_device_type(self.runner.model), enabled=self.fp16
            ):
                outputs = self.runner.model.test_step(batch)
            new = {}
            for out in outputs:
                pos = next(position)
                key = keys[pos]
                if str(out.metainfo.get('img_path')) != key:
                    raise RuntimeError(
                        f'the pass returned {out.metainfo.get("img_path")} where '
                        f'{key} was expected'
                    )
                pred = out.pred_sem_seg.data.squeeze(0)
                label = out.gt_sem_seg.data.squeeze(0).to(pred.device)
                counts = counts_of_batch(
                    pred[None], label[None], num_classes, ignore_index
                )[0]
                pool.add(counts)
                new[key] = counts
            if self.cache is not None:
                self.cache.put_corruption_units(
                    unit[0], unit[1], new, {k: stamps[k] for k in new}
                )
            self._progress(unit, u_idx, len(new), b_idx, len(loader))

    # ------------------------------------------------------------- progress
    def _progress_start(self, n_images: int, to_compute: int) -> None:
        self._t0 = time.time()
        self._computed = 0
        self._to_compute = to_compute
        restored = n_images * len(self.units) - to_compute
        print_log(
            f'Corruptions: {len(self.corruptions)} corruptions x severities '
            f'{self.severities} + clean = {len(self.units)} passes over '
            f'{n_images} images on this rank'
            + (
                f'; {restored} image passes restored from {self.cache.folder}'
                if restored
                else ''
            ),
            logger='current',
        )

    def _progress(self, unit, u_idx: int, n: int, b_idx: int, n_batches: int) -> None:
        self._computed += n
        if (b_idx + 1) % self.log_interval and b_idx + 1 != n_batches:
            return
        elapsed = time.time() - self._t0
        left = max(self._to_compute - self._computed, 0)
        secs = int(elapsed / max(self._computed, 1) * left)
        print_log(
            f'Corruptions [pass {u_idx + 1}/{len(self.units)}: {unit_name(unit)}, '
            f'batch {b_idx + 1}/{n_batches}] image passes computed on this rank: '
            f'{self._computed}/{self._to_compute}, ETA '
            f'{secs // 3600}:{secs % 3600 // 60:02d}:{secs % 60:02d}',
            logger='current',
        )


def _device_type(model) -> str:
    param = next(iter(model.parameters()), None)
    return param.device.type if param is not None else 'cpu'


class _Pool:
    """The sums of a pass's per-image counts, and the number of images."""

    def __init__(self, num_classes: int) -> None:
        self.arrays = {k: np.zeros(num_classes, np.int64) for k in RECORD_COUNT_KEYS}
        self.correct = self.valid = self.images = 0

    def add(self, counts: dict) -> None:
        for k in RECORD_COUNT_KEYS:
            self.arrays[k] += np.asarray(counts[k], np.int64)
        self.correct += int(counts['correct'])
        self.valid += int(counts['valid'])
        self.images += 1

    def to_json(self) -> dict:
        out = {k: v.tolist() for k, v in self.arrays.items()}
        out.update(correct=self.correct, valid=self.valid, images=self.images)
        return out
