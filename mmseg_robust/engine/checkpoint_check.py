"""Refuse a test checkpoint that does not fit the model.

mmengine loads the checkpoint of ``tools/test.py`` with ``strict=False`` and only
warns about missing or unexpected tensors, so a config whose class count or head
disagrees with the checkpoint (e.g. a DDC-AT training checkpoint under the plain
config) would be evaluated with randomly initialised weights. The numbers of such
a model are meaningless: :class:`CheckpointCheckHook` fails before the first batch
instead, naming the tensors and the fix. ``tools/test.py`` adds it to every test
(it checks the checkpoint mmengine has just read, without reading the file
again); :class:`~mmseg_robust.engine.AdversarialTestLoop` runs the same check
itself when the hook is not there. A validation during training checks nothing:
the model it validates is the one being trained, not ``load_from``.
"""

import os.path as osp

from mmengine.hooks import Hook

from mmseg_robust.registry import HOOKS

__all__ = ['CheckpointCheckHook', 'check_loaded_checkpoint']


def check_loaded_checkpoint(runner, loaded=None) -> None:
    """Raise if the checkpoint the runner loaded (``load_from``) does not fit
    its model exactly; nothing to check without a local checkpoint file.
    ``loaded``: the file's content when already read (else it is read)."""
    from mmseg_robust.models.checkpoint import check_checkpoint_fits

    path = getattr(runner, '_load_from', None)
    if not path or not osp.isfile(str(path)):
        return
    check_checkpoint_fits(
        str(path),
        runner.model,
        what=f'the checkpoint {path} (mmengine would load it partially and '
        'test random weights)',
        loaded=loaded,
    )


@HOOKS.register_module()
class CheckpointCheckHook(Hook):
    """Check the loaded checkpoint against the model before testing (see the
    module docstring)::

        custom_hooks = [dict(type='CheckpointCheckHook')]
    """

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._checked = False

    def after_load_checkpoint(self, runner, checkpoint) -> None:
        # the dict mmengine has just read from load_from: no second read
        if not getattr(runner, '_has_loaded', False):
            check_loaded_checkpoint(runner, checkpoint)
            self._checked = True

    def before_test(self, runner) -> None:
        if not self._checked:
            check_loaded_checkpoint(runner)
        self._checked = False
