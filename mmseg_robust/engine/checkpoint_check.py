"""Refuse a test checkpoint that does not fit the model.

mmengine loads the checkpoint of ``tools/test.py`` with ``strict=False`` and only
warns about missing or unexpected tensors, so a config whose class count or head
disagrees with the checkpoint (e.g. a DDC-AT training checkpoint under the plain
config) would be evaluated with randomly initialised weights. The numbers of such
a model are meaningless: :class:`CheckpointCheckHook` fails before the first batch
instead, naming the tensors and the fix. ``tools/test.py`` adds it to every test;
:class:`~mmseg_robust.engine.AdversarialTestLoop` runs the same check itself.
"""

import os.path as osp

from mmengine.hooks import Hook

from mmseg_robust.registry import HOOKS

__all__ = ['CheckpointCheckHook', 'check_loaded_checkpoint']


def check_loaded_checkpoint(runner) -> None:
    """Raise if the checkpoint the runner loaded (``load_from``) does not fit
    its model exactly; nothing to check without a local checkpoint file."""
    from mmseg_robust.models.checkpoint import check_checkpoint_fits

    path = getattr(runner, '_load_from', None)
    if not path or not osp.isfile(str(path)):
        return
    check_checkpoint_fits(
        str(path),
        runner.model,
        what=f'the checkpoint {path} (mmengine would load it partially and '
        'test random weights)',
    )


@HOOKS.register_module()
class CheckpointCheckHook(Hook):
    """Check the loaded checkpoint against the model before testing (see the
    module docstring)::

        custom_hooks = [dict(type='CheckpointCheckHook')]
    """

    priority = 'VERY_HIGH'

    def before_test(self, runner) -> None:
        check_loaded_checkpoint(runner)
