"""Narrow compatibility fixes for the pinned OpenMMLab stack on current torch.

Applied once when :mod:`mmseg_robust` is imported (configs do that through
``custom_imports``, before the Runner is built). Each fix is documented with the
failure it removes; none disables a safety check globally.

1. ``torch.load`` defaults to ``weights_only=True`` since torch 2.6, and mmengine
   0.10.7 saves Runner state that the safe unpickler rejects
   (``Unsupported global: mmengine.logging.history_buffer.HistoryBuffer``), so
   ``tools/test.py CFG CKPT`` and ``--resume`` fail. We allow-list exactly the
   globals such checkpoints contain with :func:`torch.serialization.add_safe_globals`:
   mmengine's ``HistoryBuffer``, numpy's array/scalar reconstruction, and
   ``builtins.getattr`` *restricted* to the one use pickle makes of it there
   (``getattr(HistoryBuffer, 'min')`` for the buffer's statistics methods);
   any other ``getattr`` and every other global in any file is still refused.
2. ``--launcher pytorch`` on a machine without CUDA: mmengine calls
   ``torch.cuda.set_device`` unconditionally and the default backend is NCCL, and
   the Runner wraps the model in DDP with ``device_ids=[LOCAL_RANK]``, which DDP
   refuses for CPU modules. Without CUDA we skip ``set_device``, use the gloo
   backend (with a warning when NCCL was asked for) and pass ``device_ids=None``
   for CPU modules. ``--launcher slurm`` without CUDA likewise (mmengine's slurm
   set-up calls ``torch.cuda.set_device``): the same environment from SLURM's
   variables, then gloo. DDP also refuses SyncBatchNorm in CPU modules (many
   mmseg configs, the SAT/DDC-AT ones too, use it): without CUDA the SyncBN
   layers of a CPU module are converted to BatchNorm when it is wrapped, with a
   warning. Nothing changes when CUDA is available.
3. Every checkpoint mmengine loads is loaded with ``weights_only=True``, passed
   explicitly: mmengine 0.10.7 calls ``torch.load`` without the argument (local
   files, ``open-mmlab://``, ``pavi://``, ``s3://``), which unpickles everything
   on torch < 2.6, and loads URLs through ``torch.hub.load_state_dict_from_url``,
   whose ``weights_only`` defaults to False on every torch up to 2.13 at least.
   :meth:`CheckpointLoader.load_checkpoint
   <mmengine.runner.checkpoint.CheckpointLoader.load_checkpoint>` (behind
   ``load_from``, ``--resume``, ``init_cfg=dict(type='Pretrained')`` and every
   tool) runs its loader with ``torch.load`` forced to ``weights_only=True``
   (:func:`weights_only_loads`). With fix 1 (torch >= 2.4) Runner checkpoints
   load; on torch 1.13-2.3 (``weights_only`` but no allow-list) plain weights
   load and Runner checkpoints are refused; torch < 1.13 has no safe loader and
   every load is refused (docs/installation.md, "Compatibility fixes").
   mmengine's local loader is replaced by :func:`load_local_checkpoint`, which
   reads the file once and records the digest of its bytes for the result
   cache's key (one read of the checkpoint per ``tools/test.py`` run).
"""

import atexit
import contextlib
import functools
import inspect
import io
import os
import os.path as osp
import pickle
import subprocess
import warnings

import numpy as np
import torch

from .digests import remember_digest

_APPLIED = False


def _numpy_safe_globals() -> list:
    """Globals that numpy arrays and scalars pickle through (numpy 1.x and 2.x)."""
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    safe = [_reconstruct, scalar, np.ndarray, np.dtype]
    # numpy >= 1.25 pickles dtypes through their classes (np.dtypes.Float64DType...)
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        safe += [
            getattr(dtypes, name)
            for name in dir(dtypes)
            if name.endswith('DType') and isinstance(getattr(dtypes, name), type)
        ]
    return safe


def history_buffer_getattr(obj, name: str):
    """``getattr`` as Runner checkpoints use it, and nothing else.

    A ``HistoryBuffer`` pickles its statistics methods (``min``, ``max``,
    ``current``, ``mean`` and any registered one) as ``getattr(HistoryBuffer,
    name)``. A general ``getattr`` would let a crafted file reach arbitrary methods
    of the objects it builds, so every other use is refused.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    # The defaults are filled in lazily by the first HistoryBuffer; custom ones
    # are registered with HistoryBuffer.register_statistics.
    allowed = {'min', 'max', 'current', 'mean'} | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and name in allowed:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'mmseg_robust refuses getattr({obj!r}, {name!r}) in a weights_only '
        'load: only HistoryBuffer statistics methods are allowed.'
    )


def runner_checkpoint_safe_globals() -> list:
    """The globals an mmengine Runner checkpoint needs beyond tensors and builtins."""
    from mmengine.logging.history_buffer import HistoryBuffer

    return [
        HistoryBuffer,
        (history_buffer_getattr, 'builtins.getattr'),
    ] + _numpy_safe_globals()


def _allow_runner_checkpoints() -> None:
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is None:
        # torch < 2.4: no allow-list; with weights_only=True (fix 3) Runner
        # checkpoints are refused there, plain weights files load
        return
    add_safe_globals(runner_checkpoint_safe_globals())


def has_weights_only() -> bool:
    """Whether this torch's ``torch.load`` takes ``weights_only`` (>= 1.13)."""
    # torch.serialization.load: torch.load itself may be wrapped by a library
    try:
        return 'weights_only' in inspect.signature(torch.serialization.load).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every ``torch.load`` call runs with ``weights_only=True`` (also
    where the caller passed False, as ``torch.hub`` does by default).

    Raises:
        RuntimeError: this torch has no ``weights_only`` (torch < 1.13): it
            cannot load a checkpoint without running the pickle's code.
    """
    if not has_weights_only():
        raise RuntimeError(
            f'torch {torch.__version__} has no torch.load(weights_only=True): '
            'mmseg_robust refuses to load checkpoints with it (unpickling can '
            'run arbitrary code). Install torch >= 2.4 (docs/installation.md).'
        )
    original = torch.load

    @functools.wraps(original)
    def load(*args, **kwargs):
        kwargs['weights_only'] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _safe_checkpoint_loader() -> None:
    from mmengine.runner.checkpoint import CheckpointLoader

    original = CheckpointLoader.load_checkpoint.__func__

    def load_checkpoint(cls, filename, map_location=None, logger='current'):
        try:
            with weights_only_loads():
                return original(cls, filename, map_location, logger)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(
                f'cannot load the checkpoint {filename} with torch.load('
                f'weights_only=True): {e}\nIf you trust the file (unpickling '
                'can run arbitrary code), save its state dict again as a plain '
                "{'state_dict': ...} file (torch.load(path, weights_only=False) "
                'in Python, or a converter of tools/model_converters with '
                '--unsafe-load) and load that.'
            ) from e

    load_checkpoint.__wrapped__ = original
    CheckpointLoader.load_checkpoint = classmethod(load_checkpoint)
    # local files: read once, the digest of those bytes kept for the result
    # cache's key (mmseg_robust.utils.digests)
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_local_checkpoint)


def load_local_checkpoint(filename, map_location=None):
    """mmengine's local checkpoint loader (``load_from_local``), reading the
    file once: ``torch.load`` runs on the bytes read (``weights_only=True`` by
    :func:`weights_only_loads` around every mmengine load), and their digest is
    recorded (:func:`~mmseg_robust.utils.digests.remember_digest`), so the
    result cache does not read the checkpoint a second time to hash it."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    with open(filename, 'rb') as f:
        stat = os.fstat(f.fileno())
        data = f.read()
    remember_digest(filename, stat, data)
    return torch.load(io.BytesIO(data), map_location=map_location)


def _cpu_friendly_pytorch_launcher() -> None:
    import mmengine.dist.utils as dist_utils
    from mmengine.model.wrappers import MMDistributedDataParallel

    original_init_dist_pytorch = dist_utils._init_dist_pytorch

    def _init_dist_pytorch(backend, init_backend='torch', **kwargs):
        if torch.cuda.is_available() or init_backend != 'torch':
            return original_init_dist_pytorch(
                backend, init_backend=init_backend, **kwargs
            )
        if backend == 'nccl':
            warnings.warn(
                'CUDA is not available: using the gloo backend instead of nccl '
                "(set env_cfg.dist_cfg.backend='gloo' to silence this)."
            )
            backend = 'gloo'
        import torch.distributed as torch_dist

        torch_dist.init_process_group(backend=backend, **kwargs)
        # mmengine's tools never destroy the process group; a gloo group left
        # to the interpreter's teardown sometimes aborts the process after the
        # run finished ("terminate called without an active exception", exit
        # code -6, seen on CPU runs here): destroy it while Python still runs.
        atexit.register(_destroy_process_group)

    _init_dist_pytorch.__wrapped__ = original_init_dist_pytorch
    dist_utils._init_dist_pytorch = _init_dist_pytorch

    original_init_dist_slurm = dist_utils._init_dist_slurm

    def _init_dist_slurm(backend, port=None, init_backend='torch', **kwargs):
        if torch.cuda.is_available() or init_backend != 'torch':
            return original_init_dist_slurm(
                backend, port=port, init_backend=init_backend, **kwargs
            )
        # mmengine's slurm set-up without torch.cuda.set_device: the same
        # environment variables from SLURM's, then a gloo process group.
        proc_id = int(os.environ['SLURM_PROCID'])
        if port is not None:
            os.environ['MASTER_PORT'] = str(port)
        os.environ.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in os.environ:
            node_list = os.environ['SLURM_NODELIST']
            os.environ['MASTER_ADDR'] = subprocess.getoutput(
                f'scontrol show hostname {node_list} | head -n1'
            )
        os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
        os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')
        os.environ['RANK'] = str(proc_id)
        _init_dist_pytorch(backend, init_backend=init_backend, **kwargs)

    _init_dist_slurm.__wrapped__ = original_init_dist_slurm
    dist_utils._init_dist_slurm = _init_dist_slurm

    original_ddp_init = MMDistributedDataParallel.__init__

    def __init__(self, module, detect_anomalous_params=False, **kwargs):
        device_ids = kwargs.get('device_ids')
        on_cpu = all(p.device.type == 'cpu' for p in module.parameters())
        if on_cpu and not torch.cuda.is_available():
            if device_ids is not None:
                # DDP requires device_ids=None for CPU modules.
                kwargs['device_ids'] = None
            module = _sync_bn_to_bn_on_cpu(module)
        original_ddp_init(
            self, module, detect_anomalous_params=detect_anomalous_params, **kwargs
        )

    __init__.__wrapped__ = original_ddp_init
    MMDistributedDataParallel.__init__ = __init__


def _sync_bn_to_bn_on_cpu(module):
    """``module`` with its SyncBatchNorm layers reverted to BatchNorm, with a
    warning (DDP refuses SyncBatchNorm in CPU modules)."""
    from mmengine.model import revert_sync_batchnorm

    sync_types = [torch.nn.SyncBatchNorm]
    try:  # the layers mmengine's revert_sync_batchnorm also converts
        from mmcv.ops import SyncBatchNorm as MMCVSyncBatchNorm

        sync_types.append(MMCVSyncBatchNorm)
    except ImportError:
        pass
    n_sync = sum(isinstance(m, tuple(sync_types)) for m in module.modules())
    if not n_sync:
        return module
    # The BatchNorm layers take over the SyncBN layers' parameter and buffer
    # tensors (the same objects: an optimizer built before would still hold
    # them; the Runner builds it after wrapping anyway) and the state_dict keys.
    module = revert_sync_batchnorm(module)
    warnings.warn(
        f"CUDA is not available: the model's {n_sync} SyncBatchNorm layers were "
        'converted to BatchNorm, because SyncBatchNorm does not run on CPU '
        'under DDP. Each process normalises with the statistics of its own '
        'batch (SyncBN would use those of all processes); on GPUs the config '
        'runs with SyncBN as written.'
    )
    return module


def _destroy_process_group() -> None:
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def apply_compat() -> None:
    """Apply the fixes of this module (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    _allow_runner_checkpoints()
    _safe_checkpoint_loader()
    _cpu_friendly_pytorch_launcher()
    _APPLIED = True
