"""Adversarial training loop: PIR-AT, SAT and DDC-AT (docs/algorithms.md section 5).

Per iteration, :class:`AdversarialTrainLoop` (mmengine's ``IterBasedTrainLoop``
with its own ``run_iter``)

1. runs the model's own data preprocessor on a copy of the batch and views it in
   pixel space (un-normalised, [0, 1]);
2. generates adversarial images inside :func:`~mmseg_robust.engine.attack_context`
   (eval mode, input gradients only, fp32, unwrapped module) against the main
   head's cross-entropy;
3. composes the batch by its scheme (:mod:`mmseg_robust.engine.train_schemes`) --
   PIR-AT: adversarial images only; SAT and DDC-AT: on each GPU the first half of
   the batch clean, the second half adversarial (DDC-AT attacks the whole batch
   and labels the clean half with its division labels) -- writing the
   adversarial pixels back as raw inputs;
4. calls the model's stock ``train_step`` with the runner's optimizer wrapper
   (any mmengine wrapper: data preprocessor, DDP, AMP, gradient accumulation all
   as usual) in train mode.

It logs the clean and adversarial loss/accuracy of the attacked images and the
share of the iteration spent attacking (wall time, the device synchronised at
the boundaries), and with ``--resume`` restores the random
state (torch, numpy, python) saved in the checkpoint, after the data loader has
been advanced, so a resumed run continues exactly like an uninterrupted one.
"""

import copy
import glob
import os.path as osp
import time
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from mmengine.dist import broadcast, get_world_size
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import AmpOptimWrapper, OptimWrapperDict
from mmengine.runner import IterBasedTrainLoop
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.modules.batchnorm import _NormBase

from mmseg_robust.models.pixel_space import (
    TrainingBatchPixelView,
    ignore_index_of,
    unwrap_model,
)
from mmseg_robust.registry import ATTACKS, LOOPS, OPTIM_WRAPPERS, TRAIN_SCHEMES

from .attack_context import attack_context
from .random_state import RandomStateHook
from .resume import check_sampler_skip, skip_by_sampler
from .train_schemes import TrainScheme

__all__ = [
    'AdversarialTrainLoop',
    'sync_norm_stats',
]


class _LeakingView:
    """Model view that also accumulates the attack's parameter gradients.

    Reproduces the PIR-AT reference trainer's quirk (docs/algorithms.md,
    PIR-AT): its ``zero_grad`` runs before the attack, so the gradient of every
    attack step w.r.t. the parameters is added to the update. Each backward of
    the attack objective through this view adds ``scale * d objective / d
    theta`` to the parameters' ``.grad``, where ``scale`` is 1 / the number of
    attacked images (the reference differentiates the batch-mean CE) divided by
    the loss factor of the optimizer wrapper (gradient accumulation, see
    ``AdversarialTrainLoop._leak_scale``); the input gradient the attack asks
    for is returned as usual.
    """

    def __init__(self, view, params: List[torch.nn.Parameter], scale: float) -> None:
        self.view, self.params, self.scale = view, params, scale

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return _LeakGrad.apply(images, self)


class _LeakGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, leaking):
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            logits = leaking.view(x)
        ctx.leaking, ctx.x, ctx.logits = leaking, x, logits
        return logits.detach()

    @staticmethod
    def backward(ctx, grad_logits):
        leaking = ctx.leaking
        grads = torch.autograd.grad(
            ctx.logits, [ctx.x] + leaking.params, grad_logits, allow_unused=True
        )
        for p, g in zip(leaking.params, grads[1:]):
            if g is None:
                continue
            g = g * leaking.scale
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        return grads[0], None


class _RestoreAfterSkip:
    """The train loop's batch iterator: skips the trained batches of a resumed
    run (by replaying them, or by advancing the sampler only) and restores the
    run's random state right before the first new batch is drawn.

    mmengine's ``IterBasedTrainLoop.run`` (used unchanged) calls ``before_train``
    -- where :class:`RandomStateHook` decides that the run resumed and takes this
    rank's saved state -- then draws and discards ``loop.iter`` batches (those
    already trained) and then draws the first new one. The saved state is the one
    of the moment the checkpoint was written, i.e. before the uninterrupted run
    drew that batch; the skipped draws of an in-process loader consume random
    numbers (sampler, transforms), so the state has to be restored after them
    and before that draw. This wrapper of mmengine's ``_InfiniteDataloaderIterator``
    does so: its first draw reads how many batches the loop skips
    (``loop.iter``: 0 unless ``Runner.resume`` set it from the checkpoint), and
    after that many draws it restores the state (if the hook holds one) before
    drawing. With ``skip='replay'`` the skipped draws are the data loader's
    (mmengine's behaviour); with ``skip='sampler'`` the first of them advances
    the sampler instead (:func:`~mmseg_robust.engine.resume.skip_by_sampler`)
    and all of them return None without loading anything. Other attributes are
    the wrapped iterator's.
    """

    def __init__(self, iterator, loop, hook: RandomStateHook, skip='replay') -> None:
        self._inner = iterator
        self._loop = loop
        self._hook = hook
        self._skip = skip
        # batches still to skip; None before the first draw, -1 after the skip
        self._to_skip: Optional[int] = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._to_skip is None:
            self._to_skip = self._loop.iter
            if self._to_skip > 0 and self._skip == 'sampler':
                skip_by_sampler(self._inner, self._to_skip)
        if self._to_skip > 0:
            self._to_skip -= 1
            return None if self._skip == 'sampler' else next(self._inner)
        if self._to_skip == 0:
            self._to_skip = -1
            if self._hook.restore_loaded():
                print_log(
                    f'Restored the random state saved at iteration {self._loop.iter}',
                    logger='current',
                )
        return next(self._inner)

    def __getattr__(self, name: str):
        if name == '_inner':  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self._inner, name)


def uses_amp(optim_wrapper) -> bool:
    """Whether the update runs in mixed precision: an ``AmpOptimWrapper`` (or a
    subclass), built or as its config (when the loop is built,
    ``runner.optim_wrapper`` is usually still the config dict, which
    ``tools/train.py --amp`` sets to ``type='AmpOptimWrapper'``), also among
    several wrappers (an ``OptimWrapperDict``, or a dict of wrappers or wrapper
    configs)."""
    if isinstance(optim_wrapper, AmpOptimWrapper):
        return True
    if isinstance(optim_wrapper, OptimWrapperDict):
        return any(uses_amp(w) for w in optim_wrapper.optim_wrappers.values())
    if not isinstance(optim_wrapper, dict):
        return False
    if 'type' in optim_wrapper:
        kind = optim_wrapper['type']
        if isinstance(kind, str):
            kind = OPTIM_WRAPPERS.get(kind) or kind
        if isinstance(kind, type):
            return issubclass(kind, AmpOptimWrapper)
        return str(kind).rsplit('.', 1)[-1] == 'AmpOptimWrapper'
    if optim_wrapper.get('optimizer') is not None:
        return False  # one wrapper of the default type, OptimWrapper
    # several wrappers, by name (e.g. for a multi-optimizer constructor)
    return any(uses_amp(v) for v in optim_wrapper.values())


_AMP_LEAK_ERROR = (
    'leak_attack_grads is not supported with mixed precision (the leaked '
    'gradients would miss the loss scale): train without --amp (optim_wrapper '
    "type 'OptimWrapper') or turn train_cfg.leak_attack_grads off"
)


def _device_of(model) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    param = next(unwrap_model(model).parameters(), None)
    return torch.device('cpu') if param is None else param.device


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``: CUDA runs asynchronously, so
    without this a wall-clock reading would bill the work still queued to
    whatever the host does next. A no-op on CPU."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@LOOPS.register_module()
class AdversarialTrainLoop(IterBasedTrainLoop):
    """Iteration-based train loop with adversarial training (section 5).

    Select it in a config; any mmengine optimizer wrapper works (the loop enters
    :func:`~mmseg_robust.engine.attack_context` around the attack itself, and
    ``tools/train.py --amp`` gives the update mixed precision as for any mmseg
    config)::

        train_cfg = dict(
            type='AdversarialTrainLoop', scheme='pirat', max_iters=80000,
            val_interval=8000,
            attack=dict(type='PGD', eps=4, steps=5, step_size=2.55,
                        random_start=False))
        optim_wrapper = dict(type='OptimWrapper', optimizer=...)

    Only :meth:`run_iter` is overridden: mmengine's ``run`` (resume's data loader
    skip included) runs as is, and the random state of a resumed run is restored
    by the loop's batch iterator right after the skip, which with
    ``resume_skip='sampler'`` advances the sampler instead of loading the
    skipped batches (see :class:`_RestoreAfterSkip`).

    Args:
        runner, dataloader, max_iters, val_begin, val_interval,
            dynamic_intervals: as :class:`mmengine.runner.IterBasedTrainLoop`.
        scheme (str | dict | TrainScheme): the batch composition, a name of
            ``TRAIN_SCHEMES``: ``'pirat'`` (adversarial images only, the
            default), ``'sat'`` (first half clean, second half adversarial on
            each GPU) or ``'ddcat'`` (as SAT, plus the division labels of DDC-AT;
            needs a DDC-AT decode head); or a config dict / instance of a
            registered :class:`~mmseg_robust.engine.TrainScheme`.
        attack (dict): attack config from ``ATTACKS`` (eps, step sizes in /255).
            Defaults to PIR-AT's: PGD, eps 4, 5 steps of 2.55, no random start.
        log_clean (bool): with a random-start attack, spend one extra forward
            per iteration to log the clean loss/accuracy (without random start
            the attack's first iterate gives them for free). Default: True.
        leak_attack_grads (bool): reproduce the PIR-AT reference trainer's
            quirk: the parameter gradients of the attack steps (eval mode,
            batch-mean objective) are added to the update, because the
            reference calls ``zero_grad`` before the attack. Off by default
            (the attack takes input gradients only, as the method is
            described); turn it on only to reproduce the reference's training
            exactly (the published PIR-AT numbers come from that objective,
            docs/algorithms.md section 5.1). With gradient accumulation
            (``optim_wrapper.accumulative_counts``) the leaked gradients are
            divided by the same loss factor as the loss, so k accumulated
            micro-batches leak what one batch k times larger does. Not
            supported with mixed precision (the leaked gradients would miss
            the loss scale): refused when the loop is built.
        resume_skip (str): how a resumed run skips the batches already
            trained. ``'replay'`` (default, mmengine's): the data loader loads
            and discards every one of them (resuming at iteration 10,000 with
            16 images per process loads 160,000 images per process).
            ``'sampler'``: only the sampler is advanced, nothing is loaded
            (needs mmengine's ``InfiniteSampler`` or ``DefaultSampler``; any
            other sampler is refused when the loop is built). With
            ``num_workers=0`` both continue exactly like an uninterrupted run
            (the random state is restored after the skip); with worker
            processes, ``'sampler'`` restarts their random streams, so the
            augmentations differ from an uninterrupted run's (logged).

    The training attack runs no forward at its returned images (a PGD/BIM/FGSM
    attack is built with ``predict_output=False`` unless the attack config sets
    it): ``adv.loss``/``adv.acc`` in the log are those of the last iterate the
    attack evaluated, i.e. the input of its last gradient step (one step before
    the images the update sees; with one step, the clean images).

    The attack ignores the label value of the model's decode head
    (``ignore_index``, 255 unless the head sets another) and the padding the
    data preprocessor adds to images smaller than its ``size``.
    """

    def __init__(
        self,
        runner,
        dataloader,
        max_iters: int,
        val_begin: int = 1,
        val_interval: int = 1000,
        dynamic_intervals=None,
        scheme: Union[str, dict, TrainScheme, None] = None,
        attack: Optional[dict] = None,
        log_clean: bool = True,
        leak_attack_grads: bool = False,
        resume_skip: str = 'replay',
    ) -> None:
        # before the data loader is built (building it may generate a dataset)
        _check_load_from(runner)
        super().__init__(
            runner, dataloader, max_iters, val_begin, val_interval, dynamic_intervals
        )
        self.train_scheme = self._build_scheme(scheme)
        #: the scheme's registered name ('pirat', 'sat', 'ddcat', ...)
        self.scheme = self.train_scheme.name
        if attack is None:
            attack = dict(
                type='PGD', eps=4, steps=5, step_size=2.55, random_start=False
            )
        self.attack_cfg = dict(attack)
        self.ignore_index = ignore_index_of(runner.model)
        self.attack = ATTACKS.build(
            dict(self.attack_cfg, ignore_index=self.ignore_index)
        )
        if 'predict_output' not in self.attack_cfg and hasattr(
            self.attack, 'predict_output'
        ):
            # the forward at the returned images would only feed the log
            self.attack.predict_output = False
        self.log_clean = log_clean
        self.leak_attack_grads = bool(leak_attack_grads)
        if self.leak_attack_grads and uses_amp(runner.optim_wrapper):
            raise ValueError(_AMP_LEAK_ERROR)
        if resume_skip not in ('replay', 'sampler'):
            raise ValueError(
                f"train_cfg.resume_skip must be 'replay' or 'sampler', got "
                f'{resume_skip!r}'
            )
        if resume_skip == 'sampler':
            check_sampler_skip(self.dataloader)
        self.resume_skip = resume_skip
        self.random_state_hook = RandomStateHook()
        runner.register_hook(self.random_state_hook)
        self.dataloader_iterator = _RestoreAfterSkip(
            self.dataloader_iterator, self, self.random_state_hook, resume_skip
        )

    def _build_scheme(self, scheme) -> TrainScheme:
        if scheme is None:
            scheme = 'pirat'
        if isinstance(scheme, TrainScheme):
            return scheme
        cfg = dict(type=scheme) if isinstance(scheme, str) else dict(scheme)
        if (
            isinstance(cfg.get('type'), str)
            and cfg['type'] not in TRAIN_SCHEMES.module_dict
        ):
            raise ValueError(
                f'unknown adversarial training scheme {cfg["type"]!r}; '
                f'choose one of {tuple(TRAIN_SCHEMES.module_dict)}'
            )
        built = TRAIN_SCHEMES.build(cfg)
        if not built.name:  # a registered scheme without a name of its own
            built.name = str(cfg['type'])
        return built

    def run_iter(self, data_batch: Dict[str, Sequence]) -> None:
        """One iteration: attack, compose, ``train_step`` (hooks as
        :meth:`IterBasedTrainLoop.run_iter`; they see the composed batch)."""
        self.runner.call_hook(
            'before_train_iter', batch_idx=self._iter, data_batch=data_batch
        )
        device = _device_of(self.runner.model)
        _synchronize(device)  # the previous iteration's queued work is not ours
        t0 = time.perf_counter()
        adv_batch, stats = self.adversarial_batch(data_batch)
        _synchronize(device)
        t_attack = time.perf_counter() - t0
        outputs = self.runner.model.train_step(
            adv_batch, optim_wrapper=self.runner.optim_wrapper
        )
        self._sync_norm_stats()
        _synchronize(device)
        stats['attack_time_share'] = t_attack / (time.perf_counter() - t0)
        outputs.update(stats)
        self.runner.call_hook(
            'after_train_iter',
            batch_idx=self._iter,
            data_batch=adv_batch,
            outputs=outputs,
        )
        self._iter += 1

    def _sync_norm_stats(self) -> None:
        """Under DDP, give every process rank 0's running statistics of the
        normalisation layers after each update.

        mmengine wraps the model with ``broadcast_buffers=False`` (unless a
        config sets ``model_wrapper_cfg``), so each process updates the running
        statistics of its BatchNorm layers with its own batch and keeps them.
        Without this the next attack and a validation would run on each process
        with its own statistics, while the checkpoint holds rank 0's only (and a
        resumed run could not continue like an uninterrupted one). The
        broadcast runs whatever ``broadcast_buffers`` says, once per iteration,
        so that the attack, the validation, the checkpoint and the end of
        training all see rank 0's statistics. Before the first iteration all
        processes hold the same ones already (with ``broadcast_buffers=False``
        DDP's constructor does not broadcast buffers, but freshly built layers
        start equal, ``Runner.train`` broadcasts rank 0's state after
        initialising the weights, and ``load_from``/``--resume`` load the same
        file on every process). See :func:`sync_norm_stats`.
        """
        model = self.runner.model
        if get_world_size() < 2 or not is_model_wrapper(model):
            return
        sync_norm_stats(unwrap_model(model))

    # ---------------------------------------------------------- the batch
    def adversarial_batch(self, data_batch: dict):
        """Compose the training batch of one iteration.

        Returns:
            tuple[dict, dict]: the batch for ``train_step`` (raw inputs, some
            replaced by adversarial images; DDC-AT: new data samples carrying
            ``gt_division``) and the statistics to log.
        """
        model = self.runner.model
        module = unwrap_model(model)
        scheme = self.train_scheme
        # The preprocessor pads gt maps of the data samples in place: work on a
        # copy, the original batch goes to train_step.
        processed = module.data_preprocessor(
            dict(
                inputs=data_batch['inputs'],
                data_samples=copy.deepcopy(data_batch['data_samples']),
            ),
            True,
        )
        batch_view = TrainingBatchPixelView(
            module, processed['inputs'], processed['data_samples']
        )
        b = batch_view.images.shape[0]
        attacked = scheme.attacked_indices(b)
        to_attack = scheme.images_to_attack(b)
        view = batch_view.subset(to_attack)
        with attack_context(
            model,
            param_grads=self.leak_attack_grads,
            amp=uses_amp(self.runner.optim_wrapper),
        ):
            out = self.attack.run(
                self._attacked_model(view, module), view.images, view.labels, view.valid
            )
            stats = self._stats(out, view)
            extra = scheme.extra_labels(view, out.adv_images, to_attack, attacked)
        inputs = data_batch['inputs']
        raw = view.raw_inputs(out.adv_images, [inputs[i] for i in to_attack])
        return scheme.compose(data_batch, raw, to_attack, attacked, extra), stats

    def _attacked_model(self, view, module):
        """The model view the attack differentiates (see ``leak_attack_grads``)."""
        if not self.leak_attack_grads:
            return view
        params = [p for p in module.parameters() if p.requires_grad]
        return _LeakingView(view, params, self._leak_scale(view.images.shape[0]))

    def _leak_scale(self, batch_size: int) -> float:
        """The factor of the leaked parameter gradients: 1 / ``batch_size`` (the
        reference differentiates the batch-mean objective), divided by the loss
        factor of the update. mmengine's ``OptimWrapper.scale_loss`` divides the
        loss by ``accumulative_counts`` (in the last iterations, when the
        remaining ones are fewer, by their number); calling it on 1 before the
        update gives exactly the factor it will apply to this iteration's loss.
        """
        wrapper = self.runner.optim_wrapper
        scale_loss = getattr(wrapper, 'scale_loss', None)
        if scale_loss is None:
            raise ValueError(
                'leak_attack_grads needs one optimizer wrapper with '
                f'scale_loss (an OptimWrapper), got {type(wrapper).__name__}: '
                'turn train_cfg.leak_attack_grads off'
            )
        return float(scale_loss(torch.ones(()))) / batch_size

    def _stats(self, out, view) -> dict:
        stats = {}
        s = out.stats or {}
        random_start = getattr(self.attack, 'random_start', False)
        valid = view.labels != self.ignore_index
        if view.valid is not None:
            valid &= view.valid
        n_valid = valid.sum().clamp_min(1)
        if 'start_loss' in s and not random_start:
            stats['clean.loss'], stats['clean.acc'] = s['start_loss'], s['start_acc']
        elif self.log_clean:
            with torch.no_grad():
                logits = view(view.images)
                ce = F.cross_entropy(
                    logits, torch.where(valid, view.labels, 0), reduction='none'
                )
                stats['clean.loss'] = (ce * valid).sum() / n_valid
                stats['clean.acc'] = (
                    (logits.argmax(1) == view.labels) & valid
                ).sum() / n_valid
        if out.adv_pred is None:
            # no forward at the returned images (predict_output=False): the
            # last iterate the attack evaluated (the input of its last step)
            stats['adv.loss'], stats['adv.acc'] = s['last_loss'], s['last_acc']
        else:
            if 'final_loss' in s:
                stats['adv.loss'] = s['final_loss']
            stats['adv.acc'] = ((out.adv_pred == view.labels) & valid).sum() / n_valid
        # accuracies in percent, like mmseg's acc_seg
        return {
            k: float(v) * (100 if k.endswith('.acc') else 1) for k, v in stats.items()
        }


def sync_norm_stats(module: torch.nn.Module, src: int = 0) -> None:
    """Copy process ``src``'s running statistics of the normalisation layers
    to every process (one coalesced broadcast per dtype and device).

    Covers the buffers that training changes: ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` of every
    :class:`torch.nn.modules.batchnorm._NormBase` that tracks running
    statistics (BatchNorm, SyncBatchNorm, InstanceNorm with
    ``track_running_stats=True``). Other buffers (e.g. the relative-position
    indices of a transformer, constant and possibly large) are left alone. Does
    nothing when the module has no such layer.
    """
    groups: Dict[tuple, List[torch.Tensor]] = {}
    for m in module.modules():
        if not isinstance(m, _NormBase) or not m.track_running_stats:
            continue
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
            if buf is not None:
                groups.setdefault((buf.dtype, buf.device), []).append(buf)
    for bufs in groups.values():
        flat = _flatten_dense_tensors(bufs)
        broadcast(flat, src)
        for buf, synced in zip(bufs, _unflatten_dense_tensors(flat, bufs)):
            buf.copy_(synced)


def _check_load_from(runner) -> None:
    """Refuse a missing ``load_from`` before anything is built, naming the
    command that writes it.

    Robust fine-tuning starts from another run's checkpoint (the synthetic
    PIR-AT/SAT/DDC-AT configs from the clean model). A path under
    ``work_dirs/<name>/`` is what ``tools/train.py <name>.py`` writes, so the
    config of that name is looked up next to this config and under
    ``configs/``.
    """
    path = getattr(runner, '_load_from', None)
    if not path:
        return
    path = str(path)
    if '://' in path or osp.isfile(path):
        return
    hint = ''
    parts = osp.normpath(path).split(osp.sep)
    if 'work_dirs' in parts and parts.index('work_dirs') + 1 < len(parts) - 1:
        name = parts[parts.index('work_dirs') + 1]
        found = sorted(
            glob.glob(osp.join('configs', '**', name + '.py'), recursive=True)
        )
        if found:
            hint = (
                f' It is written by `python tools/train.py {found[0]}` '
                f'(checkpoints go to work_dirs/{name}/).'
            )
        else:
            hint = f' It is written by training the config {name}.py.'
    raise FileNotFoundError(
        f'load_from={path} does not exist: this config starts from that '
        f'checkpoint.{hint} Train it first, or point the config at your own '
        f'checkpoint with --cfg-options load_from=PATH.'
    )
