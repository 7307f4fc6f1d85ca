"""Adversarial training loop: PIR-AT, SAT and DDC-AT (ALGORITHMS.md section 5).

Per iteration, :class:`AdversarialTrainLoop`

1. runs the model's own data preprocessor on a copy of the batch and views it in
   pixel space (un-normalised, [0, 1]);
2. generates adversarial images inside the optimizer wrapper's attack context
   (eval mode, input gradients only, fp32, unwrapped module) against the main
   head's cross-entropy;
3. composes the batch by scheme -- PIR-AT: adversarial images only; SAT and
   DDC-AT: on each GPU the first half of the batch clean, the second half
   adversarial (DDC-AT attacks the whole batch and labels the clean half with its
   division labels) -- writes the adversarial pixels back as raw inputs;
4. calls the model's stock ``train_step`` (data preprocessor, DDP, AMP, gradient
   accumulation all as usual) in train mode.

It logs the clean and adversarial loss/accuracy of the attacked images and the
share of the iteration spent attacking, and with ``--resume`` restores the random
state (torch, numpy, python) saved in the checkpoint, after the data loader has
been advanced, so a resumed run continues exactly like an uninterrupted one.
"""
import copy
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.runner import IterBasedTrainLoop
from mmengine.structures import PixelData

from mmseg_robust.models.pixel_space import PixelNormalizer, unwrap_model
from mmseg_robust.registry import ATTACKS, LOOPS
from .optim_wrappers import AttackContextMixin
from .random_state import RandomStateHook

__all__ = ['AdversarialTrainLoop', 'TrainPixelView']

SCHEMES = ('pirat', 'sat', 'ddcat')


class TrainPixelView:
    """Pixel-space view of a preprocessed *training* batch (padded, stacked).

    Args:
        module (nn.Module): the unwrapped segmentor.
        inputs (Tensor): the preprocessor's normalised, padded batch.
        data_samples (list): its data samples (padded ``gt_sem_seg``).

    Attributes:
        images (Tensor): ``(B, 3, H, W)`` in ``[0, 1]``, the network's channel
            order, at the padded size (padding is excluded from the losses via
            the labels' ``seg_pad_val``, which is the ignore index).
        labels (Tensor): long ``(B, H, W)``.
    """

    def __init__(self, module, inputs, data_samples) -> None:
        self.module = module
        self.normalizer = PixelNormalizer(module.data_preprocessor)
        self.metas = [ds.metainfo for ds in data_samples]
        self.images = self.normalizer.to_pixels(inputs)
        self.labels = torch.stack(
            [ds.gt_sem_seg.data.squeeze(0).long() for ds in data_samples])

    def normalized(self, images):
        return self.normalizer.to_inputs(images)

    def __call__(self, images, metas: Optional[List[dict]] = None):
        """Main-head logits at the (padded) input size."""
        metas = self.metas[:images.shape[0]] if metas is None else metas
        return self.module.encode_decode(self.normalized(images), metas)

    def routed_prediction(self, images) -> torch.Tensor:
        """DDC-AT: argmax of the eval-mode routed output (section 5.3)."""
        feats = self.module.extract_feat(self.normalized(images))
        # the branches are upsampled to the input size before routing, as in the
        # reference implementation
        logits = self.module.decode_head.routed_logits(
            feats, size=images.shape[2:])
        return logits.argmax(1)


def _raw_input(pixels: torch.Tensor, meta: dict, bgr_to_rgb: bool,
               like: torch.Tensor) -> torch.Tensor:
    """Pixel image ``(3, Hp, Wp)`` in [0, 1] -> raw input as the dataloader gives
    it (0..255, the loader's channel order, without the preprocessor's padding)."""
    left, right, top, bottom = meta.get('padding_size', (0, 0, 0, 0))
    h, w = pixels.shape[1:]
    x = pixels[:, top:h - bottom, left:w - right] * 255.0
    if bgr_to_rgb:
        x = x[[2, 1, 0]]
    if tuple(x.shape) != tuple(like.shape):
        raise RuntimeError(
            f'adversarial image of shape {tuple(x.shape)} does not match the '
            f'input {tuple(like.shape)}: unexpected padding metainfo')
    return x.to(like.device)


@LOOPS.register_module()
class AdversarialTrainLoop(IterBasedTrainLoop):
    """Iteration-based train loop with adversarial training (section 5).

    Select it in a config, with an adversarial optimizer wrapper::

        train_cfg = dict(
            type='AdversarialTrainLoop', scheme='pirat', max_iters=80000,
            val_interval=8000,
            attack=dict(type='PGD', eps=4, steps=5, step_size=2.55,
                        random_start=False))
        optim_wrapper = dict(type='AdversarialOptimWrapper', optimizer=...)

    Args:
        runner, dataloader, max_iters, val_begin, val_interval,
            dynamic_intervals: as :class:`mmengine.runner.IterBasedTrainLoop`.
        scheme (str): ``'pirat'`` (adversarial images only), ``'sat'`` (first
            half clean, second half adversarial on each GPU) or ``'ddcat'`` (as
            SAT, plus the division labels of DDC-AT; needs a DDC-AT decode head).
        attack (dict): attack config from ``ATTACKS`` (eps, step sizes in /255).
            Defaults to PIR-AT's: PGD, eps 4, 5 steps of 2.55, no random start.
        log_clean (bool): with a random-start attack, spend one extra forward
            per iteration to log the clean loss/accuracy (without random start
            the attack's first iterate gives them for free). Default: True.
    """

    def __init__(self,
                 runner,
                 dataloader,
                 max_iters: int,
                 val_begin: int = 1,
                 val_interval: int = 1000,
                 dynamic_intervals=None,
                 scheme: str = 'pirat',
                 attack: Optional[dict] = None,
                 log_clean: bool = True) -> None:
        super().__init__(runner, dataloader, max_iters, val_begin,
                         val_interval, dynamic_intervals)
        if scheme not in SCHEMES:
            raise ValueError(f'unknown adversarial training scheme {scheme!r}; '
                             f'choose one of {SCHEMES}')
        self.scheme = scheme
        if attack is None:
            attack = dict(
                type='PGD', eps=4, steps=5, step_size=2.55, random_start=False)
        self.attack_cfg = dict(attack)
        self.attack = ATTACKS.build(self.attack_cfg)
        self.log_clean = log_clean
        self.random_state_hook = RandomStateHook()
        runner.register_hook(self.random_state_hook)

    # ------------------------------------------------------------------- run
    def run(self) -> torch.nn.Module:
        """:meth:`IterBasedTrainLoop.run`, restoring the random state of a resumed
        run right after the data loader has been advanced past the trained
        iterations (before the next batch is drawn, so the skipped batches of an
        in-process loader do not consume it)."""
        self._check_optim_wrapper()
        self.runner.call_hook('before_train')
        self.runner.call_hook('before_train_epoch')
        if self._iter > 0:
            print_log(
                f'Advance dataloader {self._iter} steps to skip data that has '
                'already been trained',
                logger='current')
            for _ in range(self._iter):
                next(self.dataloader_iterator)
        if self.random_state_hook.restore_loaded():
            print_log(
                f'Restored the random state saved at iteration {self._iter}',
                logger='current')
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
            data_batch = next(self.dataloader_iterator)
            self.run_iter(data_batch)
            self._decide_current_val_interval()
            if (self.runner.val_loop is not None
                    and self._iter >= self.val_begin
                    and (self._iter % self.val_interval == 0
                         or self._iter == self._max_iters)):
                self.runner.val_loop.run()
        self.runner.call_hook('after_train_epoch')
        self.runner.call_hook('after_train')
        return self.runner.model

    def _check_optim_wrapper(self) -> None:
        wrappers = getattr(self.runner.optim_wrapper, 'optim_wrappers', None)
        wrappers = wrappers.values() if wrappers else [
            self.runner.optim_wrapper
        ]
        for w in wrappers:
            if not isinstance(w, AttackContextMixin):
                raise TypeError(
                    'AdversarialTrainLoop needs an adversarial optimizer wrapper: '
                    "set optim_wrapper.type='AdversarialOptimWrapper' (or "
                    f"'AdversarialAmpOptimWrapper'), got {type(w).__name__}")

    def run_iter(self, data_batch: Dict[str, Sequence]) -> None:
        self.runner.call_hook(
            'before_train_iter', batch_idx=self._iter, data_batch=data_batch)
        t0 = time.perf_counter()
        adv_batch, stats = self.adversarial_batch(data_batch)
        t_attack = time.perf_counter() - t0
        outputs = self.runner.model.train_step(
            adv_batch, optim_wrapper=self.runner.optim_wrapper)
        stats['attack_time_share'] = t_attack / (time.perf_counter() - t0)
        outputs.update(stats)
        self.runner.call_hook(
            'after_train_iter',
            batch_idx=self._iter,
            data_batch=adv_batch,
            outputs=outputs)
        self._iter += 1

    # ---------------------------------------------------------- the batch
    def attacked_indices(self, batch_size: int) -> List[int]:
        """Images that become adversarial: all (PIR-AT) or the second half."""
        if self.scheme == 'pirat':
            return list(range(batch_size))
        if batch_size < 2:
            raise ValueError(
                f'{self.scheme} trains on a first half of clean and a second half '
                'of adversarial images per GPU: the batch size per GPU must be at '
                'least 2')
        return list(range(batch_size // 2, batch_size))

    def adversarial_batch(self, data_batch: dict):
        """Compose the training batch of one iteration.

        Returns:
            tuple[dict, dict]: the batch for ``train_step`` (raw inputs, some
            replaced by adversarial images; DDC-AT: ``gt_division`` on every data
            sample) and the statistics to log.
        """
        model = self.runner.model
        module = unwrap_model(model)
        pre = module.data_preprocessor
        # The preprocessor pads gt maps of the data samples in place: work on a
        # copy, the original batch goes to train_step.
        processed = pre(
            dict(
                inputs=data_batch['inputs'],
                data_samples=copy.deepcopy(data_batch['data_samples'])), True)
        view = TrainPixelView(module, processed['inputs'],
                              processed['data_samples'])
        b = view.images.shape[0]
        attacked = self.attacked_indices(b)
        to_attack = list(range(b)) if self.scheme == 'ddcat' else attacked
        idx = torch.as_tensor(to_attack, device=view.images.device)
        metas = [view.metas[i] for i in to_attack]
        stats = {}
        with self.runner.optim_wrapper.attack_context(model):
            out = self.attack.run(lambda x: view(x, metas), view.images[idx],
                                  view.labels[idx])
            adv = out.adv_images
            stats.update(self._stats(out, view, idx, metas))
            if self.scheme == 'ddcat':
                division = self._division_labels(view, idx, adv, attacked)
        inputs = list(data_batch['inputs'])
        bgr_to_rgb = bool(getattr(pre, 'channel_conversion', False))
        for j, i in enumerate(to_attack):
            if i in attacked:
                inputs[i] = _raw_input(adv[j], view.metas[i], bgr_to_rgb,
                                       inputs[i])
        samples = data_batch['data_samples']
        if self.scheme == 'ddcat':
            samples = [copy.copy(s) for s in samples]
            for i, s in enumerate(samples):
                s.gt_division = PixelData(data=division[i:i + 1])
        return dict(inputs=inputs, data_samples=samples), stats

    def _stats(self, out, view, idx, metas) -> dict:
        stats = {}
        s = out.stats or {}
        random_start = getattr(self.attack, 'random_start', False)
        if 'start_loss' in s and not random_start:
            stats['clean.loss'], stats['clean.acc'] = s['start_loss'], s[
                'start_acc']
        elif self.log_clean:
            with torch.no_grad():
                logits = view(view.images[idx], metas)
                labels = view.labels[idx]
                valid = labels != 255
                stats['clean.loss'] = F.cross_entropy(
                    logits, labels, ignore_index=255)
                stats['clean.acc'] = ((logits.argmax(1) == labels) & valid
                                      ).sum() / valid.sum().clamp_min(1)
        if 'final_loss' in s:
            stats['adv.loss'] = s['final_loss']
        labels = view.labels[idx]
        valid = labels != 255
        stats['adv.acc'] = ((out.adv_pred == labels) & valid).sum() / \
            valid.sum().clamp_min(1)
        # accuracies in percent, like mmseg's acc_seg
        return {
            k: float(v) * (100 if k.endswith('.acc') else 1)
            for k, v in stats.items()
        }

    def _division_labels(self, view, idx, adv, attacked) -> torch.Tensor:
        """DDC-AT (section 5.3): 1 where the eval-mode routed prediction differs
        between the clean and the adversarial input, for the clean half; all
        zeros for the adversarial half."""
        from mmseg_robust.models.decode_heads import division_labels
        with torch.no_grad():
            clean = view.routed_prediction(view.images[idx])
            adv_pred = view.routed_prediction(adv)
        division = division_labels(clean, adv_pred)
        for j, i in enumerate(idx.tolist()):
            if i in attacked:
                division[j] = 0
        return division.long()
