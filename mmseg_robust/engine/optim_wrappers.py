"""Optimizer wrappers for adversarial training (docs/algorithms.md section 5).

The wrapper owns the *attack context* of a training step: while adversarial inputs
are generated the segmentor (the unwrapped module, never the DDP wrapper) is in
eval mode, its parameters do not require gradients (so the attack's backward
passes compute input gradients only: no parameter gradient can leak into the
update, DDP's reducer hooks never fire, and the backward is cheaper), and autocast
is off (the attack runs in fp32 even when the update uses AMP). On exit the train
mode and ``requires_grad`` flags are restored, and the wrapper checks that no
parameter gradient was touched.
"""
import contextlib
from typing import Iterator

import torch
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from mmseg_robust.models.pixel_space import unwrap_model
from mmseg_robust.registry import OPTIM_WRAPPERS

__all__ = [
    'AdversarialAmpOptimWrapper', 'AdversarialOptimWrapper',
    'AttackContextMixin'
]


class AttackContextMixin:
    """Adds :meth:`attack_context` to an mmengine optimizer wrapper."""

    @contextlib.contextmanager
    def attack_context(self, model: torch.nn.Module,
                       param_grads: bool = False) -> Iterator[torch.nn.Module]:
        """Eval mode, input gradients only, fp32; yields the unwrapped module.

        Args:
            model (nn.Module): the (possibly DDP-wrapped) segmentor.
            param_grads (bool): keep the parameters trainable and let the
                attack add to their gradients (only to reproduce the PIR-AT
                reference's gradient leak, see ``AdversarialTrainLoop``'s
                ``leak_attack_grads``). Default: False.

        Example:
            >>> with optim_wrapper.attack_context(runner.model) as module:
            ...     adv = attack(view_of(module), images, labels)
        """
        if param_grads and isinstance(self, AmpOptimWrapper):
            raise ValueError(
                'leak_attack_grads is not supported with mixed precision (the '
                'leaked gradients would miss the loss scale): train without '
                '--amp or turn leak_attack_grads off')
        module = unwrap_model(model)
        was_training = module.training
        params = [p for p in module.parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        versions = [None if g is None else g._version for g in grads]
        device_type = next(module.parameters()).device.type if params else 'cpu'
        module.eval()
        frozen = [] if param_grads else params
        for p in frozen:
            p.requires_grad_(False)
        try:
            with torch.autocast(device_type=device_type, enabled=False):
                yield module
        finally:
            for p in frozen:
                p.requires_grad_(True)
            module.train(was_training)
        if param_grads:
            return
        for p, g, v in zip(params, grads, versions):
            if p.grad is not g or (g is not None and g._version != v):
                raise RuntimeError(
                    'a parameter gradient changed while generating adversarial '
                    'inputs; attacks must use torch.autograd.grad w.r.t. the '
                    'input only')


@OPTIM_WRAPPERS.register_module()
class AdversarialOptimWrapper(AttackContextMixin, OptimWrapper):
    """:class:`mmengine.optim.OptimWrapper` with the attack context of adversarial
    training. Use with :class:`~mmseg_robust.engine.AdversarialTrainLoop`::

        optim_wrapper = dict(type='AdversarialOptimWrapper',
                             optimizer=dict(type='AdamW', lr=1e-3))
    """


@OPTIM_WRAPPERS.register_module()
class AdversarialAmpOptimWrapper(AttackContextMixin, AmpOptimWrapper):
    """:class:`mmengine.optim.AmpOptimWrapper` (mixed-precision update) with the
    fp32 attack context (``tools/train.py --amp`` selects it for
    ``AdversarialOptimWrapper`` configs; needs CUDA, as mmengine's AMP wrapper)."""
