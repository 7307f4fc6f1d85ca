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
    with pytest.raises(CheckpointError, match='cannot load the checkpoint'):
        CheckpointCheckHook().before_test(runner)


def test_a_robust_test_run_reads_its_checkpoint_once(
    small_config,
    small_checkpoint,
    synthetic_root,
    data_options,
    tools_in_one_process,
    reset_mmengine,
    monkeypatch,
    tmp_path,
):
    """tools/test.py with an attack evaluator opens the checkpoint file once:
    mmengine's load, whose bytes also give the result cache's digest (before:
    once more to hash it, and more for the fit checks)."""
    import builtins
    import io
    import os
    import os.path as osp
    import shutil

    ckpt = str(tmp_path / 'model.pth')
    shutil.copyfile(small_checkpoint, ckpt)
    opened = []
    for module, name in ((builtins, 'open'), (io, 'open')):
        original = getattr(module, name)

        def counting(file, *args, _original=original, **kwargs):
            if isinstance(file, (str, os.PathLike)) and osp.abspath(file) == ckpt:
                opened.append(file)
            return _original(file, *args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    argv = (
        ['tools/test.py', small_config, ckpt, '--work-dir', str(tmp_path / 'w')]
        + ['--cfg-options', 'evaluator.type=PGD', 'evaluator.eps=8']
        + ['evaluator.steps=1', 'test_dataloader.dataset.indices=2']
        + data_options(synthetic_root)
    )
    tools_in_one_process.main(argv)
    assert len(opened) == 1, opened

    # the digest recorded at that read is the file's, and a rewritten file is
    # read again (never a stale digest)
    from mmseg_robust.utils.digests import bytes_digest, file_digest

    data = open(ckpt, 'rb').read()
    assert file_digest(ckpt) == bytes_digest(data)
    with open(ckpt, 'ab') as f:
        f.write(b'\0')
    assert file_digest(ckpt) == bytes_digest(data + b'\0')
