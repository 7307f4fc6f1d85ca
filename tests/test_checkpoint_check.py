"""The checkpoint fit check of a test run reads the checkpoint once: the hook
checks the dict mmengine's Runner.load_checkpoint has just read (not the file),
and the adversarial test loop leaves the check to the hook when it is there."""

from types import SimpleNamespace

import pytest
import torch

from mmseg_robust.engine import CheckpointCheckHook
from mmseg_robust.models.checkpoint import CheckpointError


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1))


def test_the_hook_checks_what_mmengine_loaded_without_reading_the_file(tmp_path):
    model = _model()
    path = tmp_path / 'ckpt.pth'
    path.write_bytes(b'not a checkpoint: reading this file fails')
    runner = SimpleNamespace(model=model, _load_from=str(path), _has_loaded=False)
    hook = CheckpointCheckHook()
    loaded = dict(state_dict=model.state_dict(), meta={})
    hook.after_load_checkpoint(runner, loaded)  # checked from the dict
    hook.before_test(runner)  # already checked: no read of the file
    # a dict that does not fit is refused
    bad = dict(
        state_dict={k: v for k, v in model.state_dict().items() if '1.' not in k}
    )
    with pytest.raises(CheckpointError, match='does not fit'):
        CheckpointCheckHook().after_load_checkpoint(runner, bad)
    # without a load seen (e.g. a hook added by hand after loading), the
    # file itself is checked before testing
    with pytest.raises(RuntimeError, match='cannot load the checkpoint'):
        CheckpointCheckHook().before_test(runner)
