"""The attack context of adversarial training (docs/algorithms.md section 5).

While adversarial inputs are generated, the segmentor (the unwrapped module, never
the DDP wrapper) is in eval mode, its parameters do not require gradients (so the
attack's backward passes compute input gradients only: no parameter gradient can
leak into the update, DDP's reducer hooks never fire, and the backward is cheaper),
and autocast is off (the attack runs in fp32 even when the update uses AMP). On
exit the train mode and ``requires_grad`` flags are restored, and the context
checks that no parameter gradient was touched.

It is a plain context manager on the model, so any mmengine optimizer wrapper
(stock ``OptimWrapper``, ``AmpOptimWrapper`` from ``tools/train.py --amp``, ...)
trains adversarially; :class:`~mmseg_robust.engine.AdversarialTrainLoop` enters
it around the attack.
"""

import contextlib
from typing import Iterator

import torch

from mmseg_robust.models.pixel_space import unwrap_model

__all__ = ['attack_context']


@contextlib.contextmanager
def attack_context(
    model: torch.nn.Module, param_grads: bool = False, amp: bool = False
) -> Iterator[torch.nn.Module]:
    """Eval mode, input gradients only, fp32; yields the unwrapped module.

    Args:
        model (nn.Module): the (possibly DDP-wrapped) segmentor.
        param_grads (bool): keep the parameters trainable and let the attack add
            to their gradients (only to reproduce the PIR-AT reference's
            gradient leak, see ``AdversarialTrainLoop``'s
            ``leak_attack_grads``). Default: False.
        amp (bool): the update uses mixed precision (an ``AmpOptimWrapper``).
            The attack runs in fp32 either way; with ``param_grads`` it is
            refused (the leaked gradients would miss the loss scale).
            Default: False.

    Raises:
        ValueError: ``param_grads`` with ``amp``.
        RuntimeError: (on exit, without ``param_grads``) a parameter's
            gradient was replaced or modified inside the context.

    Example:
        >>> with attack_context(runner.model) as module:
        ...     adv = attack.run(view_of(module), images, labels)
    """
    if param_grads and amp:
        raise ValueError(
            'leak_attack_grads is not supported with mixed precision (the '
            'leaked gradients would miss the loss scale): train without '
            '--amp or turn leak_attack_grads off'
        )
    module = unwrap_model(model)
    was_training = module.training
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    versions = [None if g is None else g._version for g in grads]
    device_type = params[0].device.type if params else 'cpu'
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
                'input only'
            )
