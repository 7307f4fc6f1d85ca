"""Resuming a training run: which checkpoint, whether anything is left to train,
and how the trained batches are skipped.

* :func:`configure_resume` (called by ``tools/train.py``): mmengine's
  ``--resume`` resumes from ``load_from`` whenever a config sets it, so a config
  that fine-tunes from another run's checkpoint (the synthetic PIR-AT/SAT/DDC-AT
  configs start from the clean model) would resume from *that* checkpoint,
  skip its iterations and stop without training. With ``--resume`` and
  ``load_from`` both set, the run's own latest checkpoint in the work dir is
  resumed from when there is one (and the log says so); otherwise mmengine's
  rule stands (resume from ``load_from``, e.g. another run's checkpoint in a new
  work dir).
* :class:`ResumeCheckHook` refuses a resumed run with nothing left to train.
* :func:`check_sampler_skip` and :func:`skip_by_sampler`: the fast skip of
  :class:`~mmseg_robust.engine.AdversarialTrainLoop`
  (``train_cfg.resume_skip='sampler'``). mmengine's ``IterBasedTrainLoop``
  replays every trained batch through the data loader on resume (loading and
  discarding it): resuming at iteration 10,000 with 16 images per process
  loads 160,000 images per process before the first new iteration. The fast
  skip advances only the sampler.
"""

import itertools
import logging
from typing import Optional

from mmengine.dataset import DefaultSampler, InfiniteSampler
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import EpochBasedTrainLoop, find_latest_checkpoint
from torch.utils.data import BatchSampler

from mmseg_robust.registry import HOOKS

__all__ = [
    'ResumeCheckHook',
    'check_sampler_skip',
    'configure_resume',
    'skip_by_sampler',
]


def configure_resume(cfg) -> None:
    """Prepare a train config for ``--resume`` (``cfg.resume``), in place.

    With ``load_from`` set and a ``last_checkpoint`` in ``cfg.work_dir`` (written
    by an earlier run in that work dir), ``load_from`` becomes that checkpoint,
    so mmengine resumes the run itself instead of the checkpoint the config
    starts from. Always adds :class:`ResumeCheckHook` (once), which logs that
    choice and refuses a resume with nothing left to train.
    """
    hook = dict(type='ResumeCheckHook')
    if cfg.get('resume', False) and cfg.get('load_from', None):
        latest = find_latest_checkpoint(cfg.work_dir)
        if latest:
            hook['replaced_load_from'] = str(cfg.load_from)
            cfg.load_from = latest
    hooks = [
        h for h in cfg.get('custom_hooks', None) or [] if h.get('type') != hook['type']
    ]
    cfg.custom_hooks = hooks + [hook]


@HOOKS.register_module()
class ResumeCheckHook(Hook):
    """Refuse a resumed training run that has nothing left to train.

    mmengine resumes a run at the checkpoint's iteration and then trains while
    the iteration is below ``max_iters``: a checkpoint at or past the end (a
    finished run resumed again, or a config's ``load_from`` of another, longer
    run) loads, skips every trained batch, and ends without one iteration and
    without saying so. This is a hook (added by ``tools/train.py`` through
    :func:`configure_resume`) because ``before_train`` is the one place every
    train loop (mmengine's iteration- and epoch-based ones, ours) passes after
    the checkpoint is resumed and before any batch is drawn.

    Args:
        replaced_load_from (str, optional): the config's ``load_from`` that
            :func:`configure_resume` replaced by the work dir's latest
            checkpoint (logged before the run loads it).
    """

    priority = 'VERY_HIGH'

    def __init__(self, replaced_load_from: Optional[str] = None) -> None:
        self.replaced_load_from = replaced_load_from

    def before_run(self, runner) -> None:
        if self.replaced_load_from is not None:
            runner.logger.info(
                'Resuming from the latest checkpoint in the work dir, '
                f'{runner._load_from}, not from load_from='
                f'{self.replaced_load_from} (that checkpoint is what this run '
                'started from)'
            )

    def before_train(self, runner) -> None:
        loop = runner.train_loop
        if runner.iter <= 0 or runner.iter < runner.max_iters:
            return
        if isinstance(loop, EpochBasedTrainLoop):
            where = f'epoch {runner.epoch}'
            limit = f'train_cfg.max_epochs={loop.max_epochs}'
            raise_key = 'train_cfg.max_epochs'
        else:
            where = f'iteration {runner.iter}'
            limit = f'train_cfg.max_iters={runner.max_iters}'
            raise_key = 'train_cfg.max_iters'
        raise RuntimeError(
            f'Resumed at {where} from {runner._load_from}, but {limit}: nothing '
            f'is left to train. To train further, raise {raise_key} (e.g. '
            f"--cfg-options {raise_key}=N); to train from that checkpoint's "
            'weights anew, start a fresh work dir without --resume.'
        )


# --------------------------------------------------- the fast skip on resume
def _samplers(dataloader):
    batch_sampler = getattr(dataloader, 'batch_sampler', None)
    sampler = getattr(batch_sampler, 'sampler', None)
    return batch_sampler, sampler


def check_sampler_skip(dataloader) -> None:
    """Raise unless :func:`skip_by_sampler` can advance ``dataloader``: a torch
    ``BatchSampler`` over mmengine's ``InfiniteSampler`` or ``DefaultSampler``."""
    batch_sampler, sampler = _samplers(dataloader)
    if type(batch_sampler) is not BatchSampler:
        raise ValueError(
            "train_cfg.resume_skip='sampler' needs torch's BatchSampler (the "
            'default of mmengine data loaders), this data loader batches with '
            f'{type(batch_sampler).__name__}: its batches cannot be skipped '
            "without drawing them. Use resume_skip='replay' (mmengine's skip: "
            'the trained batches are loaded again and discarded).'
        )
    if type(sampler) not in (InfiniteSampler, DefaultSampler):
        raise ValueError(
            "train_cfg.resume_skip='sampler' advances mmengine's InfiniteSampler "
            'or DefaultSampler, this data loader samples with '
            f'{type(sampler).__name__}. Use one of those '
            "(train_dataloader.sampler=dict(type='InfiniteSampler')) or "
            "resume_skip='replay' (mmengine's skip: the trained batches are "
            'loaded again and discarded).'
        )


class _SkipFirst:
    """One pass of ``sampler`` without its first ``n`` indices, standing in for
    it in ``batch_sampler`` until that pass starts (then the sampler is put
    back, so later passes are the sampler's own)."""

    def __init__(self, batch_sampler, sampler, n: int) -> None:
        self.batch_sampler, self.sampler, self.n = batch_sampler, sampler, n

    def __iter__(self):
        self.batch_sampler.sampler = self.sampler
        return itertools.islice(iter(self.sampler), self.n, None)

    def __len__(self) -> int:
        return len(self.sampler)


def skip_by_sampler(iterator, batches: int) -> None:
    """Advance mmengine's ``_InfiniteDataloaderIterator`` by ``batches``
    batches without loading them.

    ``InfiniteSampler``: its index stream (``_indices_of_rank()``) is started
    afresh and ``batches * batch_size`` indices are dropped. ``DefaultSampler``:
    the epoch is set (``set_epoch``, as mmengine's iterator does at each epoch
    end) and the next pass drops the epoch's indices already trained; a skip
    that ends an epoch leaves the iterator at that epoch's end, so the next
    draw starts the new epoch the way an uninterrupted run does. Then a new
    iterator of the data loader is made (a loader with worker processes has
    already fetched indices of the old stream; its workers restart their
    random streams). The data loader must pass :func:`check_sampler_skip`.
    """
    loader = iterator._dataloader
    check_sampler_skip(loader)
    batch_sampler, sampler = _samplers(loader)
    n = batches * batch_sampler.batch_size
    if isinstance(sampler, InfiniteSampler):
        indices = sampler._indices_of_rank()
        next(itertools.islice(indices, n, n), None)  # drop the first n
        sampler.indices = indices
    else:
        epoch, done = divmod(batches - 1, len(batch_sampler))
        iterator._epoch = epoch
        sampler.set_epoch(epoch)
        batch_sampler.sampler = _SkipFirst(
            batch_sampler, sampler, (done + 1) * batch_sampler.batch_size
        )
    iterator._iterator = iter(loader)
    msg = (
        f'Skipped the {batches} trained batches by advancing the '
        f"{type(sampler).__name__} (train_cfg.resume_skip='sampler'): "
        'they are not loaded'
    )
    if loader.num_workers > 0:
        print_log(
            msg + '. The data loader uses worker processes, whose random state '
            'is not restored: the augmentations drawn from here on differ from '
            "an uninterrupted run's",
            logger='current',
            level=logging.WARNING,
        )
    else:
        print_log(msg, logger='current')
