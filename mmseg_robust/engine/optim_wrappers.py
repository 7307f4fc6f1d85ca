"""Deprecated optimizer wrapper names of adversarial training.

Adversarial training needs no special optimizer wrapper: the attack context
(:func:`~mmseg_robust.engine.attack_context`) is entered by
:class:`~mmseg_robust.engine.AdversarialTrainLoop` on the model, so configs use
mmengine's ``OptimWrapper`` (and ``tools/train.py --amp`` turns it into
``AmpOptimWrapper`` as for any mmseg config). ``AdversarialOptimWrapper`` and
``AdversarialAmpOptimWrapper`` stay registered so that older configs still
build; they are mmengine's wrappers and warn when built.
"""

import logging
import warnings

from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from mmseg_robust.registry import OPTIM_WRAPPERS

from .attack_context import attack_context as _attack_context

__all__ = ['AdversarialAmpOptimWrapper', 'AdversarialOptimWrapper']

_WARNED = set()


class _DeprecatedName:
    """Warns (DeprecationWarning every time; the log once per process) that the
    registered name is deprecated in favour of mmengine's ``replacement``."""

    replacement = 'OptimWrapper'

    def __init__(self, *args, **kwargs) -> None:
        name = type(self).__name__
        msg = (
            f"optim_wrapper type '{name}' is deprecated: adversarial "
            f"training works with mmengine's '{self.replacement}' (the "
            'train loop enters the attack context itself); set '
            f"optim_wrapper.type='{self.replacement}'"
        )
        warnings.warn(msg, DeprecationWarning, stacklevel=2)
        if name not in _WARNED:
            _WARNED.add(name)
            print_log(msg, logger='current', level=logging.WARNING)
        super().__init__(*args, **kwargs)

    def attack_context(self, model, param_grads: bool = False):
        """Deprecated: :func:`mmseg_robust.engine.attack_context`."""
        return _attack_context(
            model, param_grads=param_grads, amp=isinstance(self, AmpOptimWrapper)
        )


@OPTIM_WRAPPERS.register_module()
class AdversarialOptimWrapper(_DeprecatedName, OptimWrapper):
    """Deprecated alias of :class:`mmengine.optim.OptimWrapper`."""


@OPTIM_WRAPPERS.register_module()
class AdversarialAmpOptimWrapper(_DeprecatedName, AmpOptimWrapper):
    """Deprecated alias of :class:`mmengine.optim.AmpOptimWrapper`."""

    replacement = 'AmpOptimWrapper'
