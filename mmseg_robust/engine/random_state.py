"""Random state in checkpoints, so a resumed run continues exactly like an
uninterrupted one (the adversarial training loop restores it after advancing the
data loader)."""
import random
from typing import Optional

import numpy as np
import torch
from mmengine.hooks import Hook

__all__ = ['RandomStateHook']


class RandomStateHook(Hook):
    """Saves the random state (torch, CUDA, numpy, python) in every checkpoint and
    hands it to :class:`AdversarialTrainLoop` on resume (which restores it after
    advancing the data loader, so the skipped batches do not consume it)."""

    priority = 'VERY_LOW'

    def __init__(self) -> None:
        self.loaded: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        state = dict(
            torch=torch.get_rng_state(),
            numpy=np.random.get_state(),
            python=random.getstate())
        if torch.cuda.is_available():
            state['cuda'] = torch.cuda.get_rng_state_all()
        checkpoint['random_state'] = state

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self.loaded = checkpoint.get('random_state')

    @staticmethod
    def restore(state: dict) -> None:
        torch.set_rng_state(state['torch'])
        np.random.set_state(tuple(state['numpy']))
        py = state['python']
        random.setstate((py[0], tuple(py[1]), py[2]))
        if 'cuda' in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['cuda'])

    def restore_loaded(self) -> bool:
        """Restore the state handed over by the last loaded checkpoint (once).

        Returns:
            bool: whether a state was restored.
        """
        if self.loaded is None:
            return False
        self.restore(self.loaded)
        self.loaded = None
        return True
