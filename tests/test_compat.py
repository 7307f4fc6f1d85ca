"""The narrow compatibility fixes applied when mmseg_robust is imported."""

import pickle
import shutil
import textwrap

import numpy as np
import pytest
import torch


def _runner_like_checkpoint():
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance('compat_test')
    hub.update_scalar('train/loss', 1.5)
    hub.update_scalar('train/loss', np.float64(0.5))
    hub.update_info('iter', 3)
    return dict(
        meta=dict(seed=np.int64(0), iter=3, dataset_meta=dict(classes=('a',))),
        state_dict=dict(w=torch.ones(2)),
        message_hub=hub.state_dict(),
        extra=np.arange(3.0),
    )


class _Arbitrary:
    pass


def test_runner_checkpoint_loads_with_weights_only(tmp_path):
    import mmseg_robust  # noqa: F401

    path = tmp_path / 'ckpt.pth'
    torch.save(_runner_like_checkpoint(), path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['meta']['iter'] == 3
    buf = ckpt['message_hub']['log_scalars']['train/loss']
    assert buf.current() == 0.5
    np.testing.assert_array_equal(ckpt['extra'], np.arange(3.0))


def test_other_globals_are_still_refused(tmp_path):
    import mmseg_robust  # noqa: F401

    path = tmp_path / 'evil.pth'
    torch.save(dict(obj=_Arbitrary()), path)
    with pytest.raises(pickle.UnpicklingError, match='_Arbitrary'):
        torch.load(path, weights_only=True)


def test_the_fix_is_needed_without_mmseg_robust(tmp_path, run_tool):
    # Guards the test above: in a process that does not import mmseg_robust the
    # same file is refused, so the fix (not a lenient torch) is what loads it.
    path = tmp_path / 'ckpt.pth'
    torch.save(_runner_like_checkpoint(), path)
    out = run_tool(
        [
            'python',
            '-c',
            textwrap.dedent(f"""
            import torch
            try:
                torch.load('{path}')
                print('LOADED')
            except Exception as e:
                print('REFUSED', type(e).__name__)
            import mmseg_robust
            torch.load('{path}')
            print('LOADED AFTER IMPORT')
            """),
        ]
    )
    assert 'REFUSED UnpicklingError' in out
    assert 'LOADED AFTER IMPORT' in out


def test_pytorch_launcher_on_cpu_uses_gloo_and_cpu_ddp(run_tool, tmp_path):
    script = textwrap.dedent("""
        import os, torch
        import mmseg_robust
        from mmengine.dist import init_dist
        from mmengine.model import MMDistributedDataParallel
        import torch.distributed as dist
        assert not torch.cuda.is_available()
        init_dist('pytorch', backend='nccl')  # the mmseg default backend
        print('BACKEND', dist.get_backend())
        ddp = MMDistributedDataParallel(
            module=torch.nn.Linear(2, 2), device_ids=[0],
            broadcast_buffers=False)
        out = ddp(torch.ones(1, 2)).sum()
        out.backward()
        print('DDP OK', ddp.device_ids)
        dist.destroy_process_group()
        """)
    out = run_tool(
        ['python', '-c', script],
        cwd=str(tmp_path),
        env=dict(
            RANK='0',
            LOCAL_RANK='0',
            WORLD_SIZE='1',
            MASTER_ADDR='127.0.0.1',
            MASTER_PORT='29631',
            CUDA_VISIBLE_DEVICES='',
        ),
    )
    assert 'BACKEND gloo' in out
    assert 'DDP OK None' in out


def test_getattr_is_allowed_only_for_history_buffer(tmp_path):
    import mmseg_robust  # noqa: F401
    from mmseg_robust.utils.compat import history_buffer_getattr

    class _Getattr:
        """Pickles as getattr(np.ndarray, 'tofile'): must be refused."""

        def __reduce__(self):
            return getattr, (np.ndarray, 'tofile')

    path = tmp_path / 'getattr.pth'
    torch.save(dict(obj=_Getattr()), path)
    with pytest.raises(pickle.UnpicklingError, match='refuses getattr'):
        torch.load(path, weights_only=True)
    from mmengine.logging.history_buffer import HistoryBuffer

    assert history_buffer_getattr(HistoryBuffer, 'mean') is HistoryBuffer.mean


def test_syncbn_becomes_batchnorm_on_cpu_keeping_the_tensors():
    from mmseg_robust.utils.compat import _sync_bn_to_bn_on_cpu

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.SyncBatchNorm(4),
        torch.nn.Sequential(torch.nn.SyncBatchNorm(4), torch.nn.ReLU()),
    )
    net[1].running_mean += 1.0
    params = {k: v for k, v in net.named_parameters()}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(UserWarning, match="model's 2 SyncBatchNorm layers were"):
        converted = _sync_bn_to_bn_on_cpu(net)
    types = [type(m) for m in converted.modules()]
    assert torch.nn.SyncBatchNorm not in types
    assert (
        sum(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for m in converted.modules()
        )
        == 2
    )
    # the same parameter objects (an optimizer holding them keeps working),
    # the same state_dict (keys and values)
    for name, p in converted.named_parameters():
        assert p is params[name], name
    assert converted.state_dict().keys() == state.keys()
    for k, v in converted.state_dict().items():
        assert torch.equal(v, state[k]), k
    converted.train()(torch.rand(2, 3, 6, 6))  # runs without a process group
    # nothing to convert: the module itself, no warning
    plain = torch.nn.Sequential(torch.nn.BatchNorm2d(2))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert _sync_bn_to_bn_on_cpu(plain) is plain


class _RunsCode:
    """Pickles as a call of ``print``: a file that would run code on loading."""

    def __reduce__(self):
        return print, ('UNPICKLED: CODE RAN',)


def _record_torch_load(monkeypatch):
    """Record the keyword arguments of every ``torch.load`` call."""
    calls = []
    original = torch.load

    def load(*args, **kwargs):
        calls.append(dict(kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, 'load', load)
    return calls


def test_mmengine_loads_local_checkpoints_with_weights_only(tmp_path, monkeypatch):
    """Every mmengine checkpoint load (load_from, --resume, init_cfg, all the
    tools) passes weights_only=True to torch.load explicitly, whatever torch's
    default is."""
    from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint

    import mmseg_robust  # noqa: F401

    path = str(tmp_path / 'ckpt.pth')
    torch.save(_runner_like_checkpoint(), path)
    calls = _record_torch_load(monkeypatch)
    ckpt = _load_checkpoint(path, map_location='cpu')
    assert ckpt['meta']['iter'] == 3
    assert calls == [dict(map_location='cpu', weights_only=True)]
    ckpt = CheckpointLoader.load_checkpoint(path)
    assert calls[-1] == dict(map_location=None, weights_only=True)
    # outside mmengine's loader torch.load is left as it was
    torch.load(path, weights_only=False)
    assert calls[-1] == dict(weights_only=False)


def test_mmengine_url_checkpoints_are_loaded_weights_only(tmp_path, monkeypatch):
    """URLs go through torch.hub, whose weights_only defaults to False: a file
    that would run code is refused there too."""
    from mmengine.runner.checkpoint import _load_checkpoint

    import mmseg_robust  # noqa: F401

    served = {}

    def download(url, dst, *args, **kwargs):
        shutil.copyfile(served[url], dst)

    monkeypatch.setattr(torch.hub, 'download_url_to_file', download)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    good, evil = str(tmp_path / 'good.pth'), str(tmp_path / 'evil.pth')
    torch.save(dict(state_dict=dict(w=torch.ones(2))), good)
    torch.save(dict(state_dict=dict(w=torch.ones(2)), obj=_RunsCode()), evil)
    served['https://example.org/good.pth'] = good
    served['https://example.org/evil.pth'] = evil
    ckpt = _load_checkpoint('https://example.org/good.pth', map_location='cpu')
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(2))
    with pytest.raises(pickle.UnpicklingError, match='evil.pth') as info:
        _load_checkpoint('https://example.org/evil.pth', map_location='cpu')
    assert 'weights_only=True' in str(info.value)
    assert 'If you trust the file' in str(info.value)


def test_torch_without_weights_only_is_refused(tmp_path, monkeypatch):
    """A torch.load without weights_only (torch < 1.13) cannot load safely:
    mmengine's loader and ours refuse instead of unpickling."""
    from mmengine.runner.checkpoint import _load_checkpoint

    import mmseg_robust  # noqa: F401
    from mmseg_robust.models.checkpoint import load_checkpoint_file
    from mmseg_robust.utils.compat import has_weights_only

    path = str(tmp_path / 'ckpt.pth')
    torch.save(dict(state_dict=dict(w=torch.ones(2))), path)
    original = torch.load
    assert has_weights_only()

    def old_load(f, map_location=None, pickle_module=None, **pickle_load_args):
        raise AssertionError('an unsafe load was attempted')

    monkeypatch.setattr(torch, 'load', old_load)
    monkeypatch.setattr(torch.serialization, 'load', old_load)
    assert not has_weights_only()
    with pytest.raises(RuntimeError, match='has no torch.load\\(weights_only=True\\)'):
        _load_checkpoint(path, map_location='cpu')
    with pytest.raises(RuntimeError, match='has no torch.load\\(weights_only=True\\)'):
        load_checkpoint_file(path)
    monkeypatch.setattr(torch, 'load', original)
    monkeypatch.setattr(torch.serialization, 'load', original)
    assert torch.equal(load_checkpoint_file(path)['state_dict']['w'], torch.ones(2))
