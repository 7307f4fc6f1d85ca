"""Random state in checkpoints, so a resumed run continues exactly like an
uninterrupted one (the adversarial training loop restores it after advancing the
data loader).

Every process keeps its own random state (with ``randomness.diff_rank_seed=True``
the ranks draw different drop-path masks, random starts, ... from the start), so a
checkpoint holds the state of every rank::

    checkpoint['random_state'] = dict(world_size=W, states=[state_0, ..., state_W-1])

(``state_r`` a dict with ``torch``, ``numpy``, ``python`` and, with CUDA,
``cuda``). Resuming from a checkpoint whose ``random_state`` is in another format
is a :class:`~mmseg_robust.models.checkpoint.CheckpointError`.

The states are restored by :class:`~mmseg_robust.engine.AdversarialTrainLoop`'s
batch iterator, after mmengine's ``IterBasedTrainLoop.run`` has advanced the data
loader past the trained iterations and before it draws the next batch.
"""

import logging
import random
from typing import List, Optional

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_dist_info
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log

from mmseg_robust.models.checkpoint import CheckpointError

__all__ = ['RandomStateHook']


class RandomStateHook(Hook):
    """Saves the random state (torch, CUDA, numpy, python) of every rank in every
    checkpoint and, when the run *resumes* from it, hands each rank its own state
    to :class:`AdversarialTrainLoop` (whose batch iterator restores it after the
    data loader has been advanced, so the skipped batches do not consume it).

    * Only a resume restores: a checkpoint given as ``load_from`` without
      ``--resume`` (e.g. PIR-AT starting from the clean model) only provides the
      weights; the random state set by ``randomness.seed`` stays in effect.
      mmengine calls ``after_load_checkpoint`` for both, so the decision waits for
      ``before_train``: the run resumed iff the train loop took over the
      checkpoint's iteration (``Runner.resume`` sets it, ``load_checkpoint`` does
      not).
    * Under DDP mmengine saves checkpoints on rank 0 only (``Runner.save_checkpoint``
      is ``master_only``, so ``before_save_checkpoint`` runs there alone and
      cannot communicate). The states of all ranks are therefore gathered in
      ``after_train_iter`` (one small ``all_gather_object``; this hook's priority
      runs it right before :class:`CheckpointHook` saves) and written by rank 0 --
      only at the iterations at which a :class:`CheckpointHook` of the runner
      saves (the test ``CheckpointHook.after_train_iter`` makes: every
      ``interval`` iterations from ``save_begin``, and the last one with
      ``save_last``; every rank decides alike, so all of them join the
      collective). A checkpoint saved at another moment (e.g. a best checkpoint
      after validation, or by another hook) holds rank 0's state only.
    * Resuming with a different number of processes restores nothing (with a
      warning): the data shards and the batch composition change anyway, so the
      run cannot continue bitwise; mapping the saved states onto the new ranks
      would give several ranks the same stream (the correlation this hook avoids),
      and refusing would block resuming a job on fewer GPUs. The run keeps the
      states mmengine's seeding gives it, as without this hook.
    """

    # Right before CheckpointHook (VERY_LOW = 90): the states gathered in
    # after_train_iter are those of the moment the checkpoint is saved.
    priority = 89

    def __init__(self) -> None:
        # this rank's state to restore, set in before_train on a resume
        self.loaded: Optional[dict] = None
        # (random_state entry, saved iteration) of the last loaded checkpoint
        self._pending: Optional[tuple] = None
        # (runner.iter, states of all ranks) gathered in the last train iteration
        self._gathered: Optional[tuple] = None

    # ---------------------------------------------------------------- saving
    @staticmethod
    def capture() -> dict:
        """This process's random state."""
        state = dict(
            torch=torch.get_rng_state(),
            numpy=np.random.get_state(),
            python=random.getstate(),
        )
        if torch.cuda.is_available():
            state['cuda'] = torch.cuda.get_rng_state_all()
        return state

    def after_train_iter(
        self, runner, batch_idx: int, data_batch=None, outputs=None
    ) -> None:
        _, world_size = get_dist_info()
        if world_size > 1 and self.checkpoint_due(runner):
            # every rank runs this; rank 0 alone saves the checkpoint next
            self._gathered = (runner.iter, all_gather_object(self.capture()))

    @staticmethod
    def checkpoint_due(runner) -> bool:
        """Whether a :class:`CheckpointHook` of ``runner`` saves a checkpoint in
        this iteration's ``after_train_iter`` (its own test)."""
        for hook in getattr(runner, 'hooks', ()):
            if not isinstance(hook, CheckpointHook) or hook.by_epoch:
                continue
            if hook.every_n_train_iters(runner, hook.interval, hook.save_begin) or (
                hook.save_last and hook.is_last_train_iter(runner)
            ):
                return True
        return False

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        rank, world_size = get_dist_info()
        if world_size == 1:
            states: List[Optional[dict]] = [self.capture()]
        elif self._gathered is not None and self._gathered[0] == runner.iter:
            states = list(self._gathered[1])
        else:
            # saved outside a training iteration: the other ranks' current
            # states cannot be collected from here
            states = [None] * world_size
            states[rank] = self.capture()
        checkpoint['random_state'] = dict(world_size=world_size, states=states)

    # --------------------------------------------------------------- loading
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self.loaded = None
        state = checkpoint.get('random_state')
        meta = checkpoint.get('meta') or {}
        self._pending = None if state is None else (state, meta.get('iter'))

    def before_train(self, runner) -> None:
        """Keep the loaded state for :meth:`restore_loaded` only if the run
        resumed (``Runner.resume`` sets the loop's iteration from the
        checkpoint after loading it; ``load_from`` alone leaves it at 0)."""
        self.loaded = None
        if self._pending is None:
            return
        state, saved_iter = self._pending
        self._pending = None
        if not runner.iter or runner.iter != saved_iter:
            print_log(
                'The loaded checkpoint was not resumed from (load_from without '
                '--resume): its random state is ignored, the configured '
                'randomness (seed) stays in effect',
                logger='current',
            )
            return
        self.loaded = self.select_own(state)

    @staticmethod
    def select_own(state: dict) -> Optional[dict]:
        """This rank's state from a checkpoint's ``random_state`` entry (None:
        nothing to restore, with a warning saying why).

        Raises:
            CheckpointError: the entry is not ``dict(world_size=W, states=[...])``.
        """
        rank, world_size = get_dist_info()
        if (
            not isinstance(state, dict)
            or not isinstance(state.get('world_size'), int)
            or not isinstance(state.get('states'), (list, tuple))
            or len(state['states']) != state['world_size']
        ):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(
                "the checkpoint's 'random_state' entry is not dict(world_size=W, "
                f'states=[one state per process]) (found {found}): resume from a '
                "checkpoint this version wrote, or delete checkpoint['random_state'] "
                'to resume with the seeded random state'
            )
        saved_world_size = state['world_size']
        if saved_world_size != world_size:
            print_log(
                f'The checkpoint holds the random states of {saved_world_size} '
                f'processes, this run has {world_size}: the random states are '
                'not restored (the run cannot continue exactly with a different '
                'number of processes); every rank keeps its seeded state',
                logger='current',
                level=logging.WARNING,
            )
            return None
        own = state['states'][rank]
        if own is None:
            print_log(
                f'The checkpoint holds no random state for rank {rank} (saved '
                'outside a training iteration): it keeps its seeded state',
                logger='current',
                level=logging.WARNING,
            )
        return own

    @staticmethod
    def restore(state: dict) -> None:
        torch.set_rng_state(state['torch'])
        np.random.set_state(tuple(state['numpy']))
        py = state['python']
        random.setstate((py[0], tuple(py[1]), py[2]))
        if 'cuda' in state and torch.cuda.is_available():
            cuda = state['cuda'][: torch.cuda.device_count()]
            torch.cuda.set_rng_state_all(cuda)

    def restore_loaded(self) -> bool:
        """Restore this rank's state of the checkpoint the run resumed from (once).

        Returns:
            bool: whether a state was restored.
        """
        if self.loaded is None:
            return False
        self.restore(self.loaded)
        self.loaded = None
        return True
