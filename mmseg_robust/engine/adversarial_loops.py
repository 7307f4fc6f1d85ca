"""Adversarial test/val loops: the Runner glue of the robustness evaluation.

One batch flows: Runner -> loop -> data preprocessor -> pixel-space view
(:class:`~mmseg_robust.models.SegmentorPixelView`) -> attacks (pure torch,
:mod:`mmseg_robust.attacks`) -> per-image counts -> metric
(:class:`~mmseg_robust.evaluation.RobustnessMetric`) -> worst-case aggregation.
"""
import json
import os.path as osp
import time
import zlib
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.logging import print_log
from mmengine.runner import TestLoop, ValLoop
from mmengine.utils import mkdir_or_exist

from mmseg_robust.attacks import derive_seeds
from mmseg_robust.evaluation.robustness_metric import (
    counts_of_batch, eps_key, image_record)
from mmseg_robust.models.backbones.strict_pretrained import check_state_dict
from mmseg_robust.models.pixel_space import (SegmentorPixelView,
                                             ignore_index_of, unwrap_model)
from mmseg_robust.registry import ATTACKS, LOOPS
from .result_cache import ResultCache, fingerprint

__all__ = ['AdversarialTestLoop', 'AdversarialValLoop', 'image_seed']


def image_seed(seed: int, key: str) -> int:
    """Per-image seed from the run seed and the image's file name.

    Depends on neither the rank, the batch nor the data root, so 1 and N processes
    (and reruns on another machine) attack each image identically.
    """
    return (int(seed) * 1_000_003 + zlib.crc32(osp.basename(key).encode())) % (
        2**31)


def _image_key(sample) -> str:
    meta = sample.metainfo
    for k in ('img_path', 'seg_map_path'):
        if meta.get(k):
            return str(meta[k])
    raise ValueError('data samples carry no img_path: the robustness loop needs '
                     'it to identify images (use mmseg datasets and PackSegInputs)')


def _accuracy(counts: dict) -> float:
    """Pixel accuracy of one image's counts (0 without valid pixels)."""
    return counts['correct'] / max(counts['valid'], 1)


def _sub_attacks(attack):
    """(name, attack, salt) of the single attacks an attack consists of.

    An ensemble (anything with an ``attacks`` dict, like SEA) is run one member at
    a time, with the per-image seeds ``SEA.run_all`` would give each member, so the
    progress log can name the attack running and results match the Python API.
    """
    members = getattr(attack, 'attacks', None)
    if isinstance(members, dict):
        return [(name, a, i) for i, (name, a) in enumerate(members.items())]
    return [(type(attack).__name__, attack, None)]


class _AdversarialEvalMixin:
    """Attack every batch, compute per-image counts, cache them, feed the metric.

    Args:
        attacks (list[dict]): attack configs built from ``ATTACKS`` (without
            ``eps``: it is set from ``eps``), e.g.
            ``[dict(type='SEA', n_iter=300, class_weights='voc')]``.
        eps (float | list[float]): radii in /255 units; every attack runs at each.
        seed (int): seed of the random starts (per image, see :func:`image_seed`).
        resume (bool): save per-image results under
            ``work_dir/robustness_cache/<fingerprint>/`` and skip images found
            there (an interrupted run restarted with the same command continues).
        log_interval (int): log progress every this many batches.
    """

    def _setup(self,
               attacks: Union[dict, Sequence[dict]],
               eps: Union[float, Sequence[float]] = 8,
               seed: int = 0,
               resume: bool = True,
               log_interval: int = 1) -> None:
        if isinstance(attacks, dict):
            attacks = [attacks]
        if not attacks:
            raise ValueError('the adversarial loop needs at least one attack, '
                             'e.g. attacks=[dict(type="SEA")]')
        eps_list = [eps] if isinstance(eps, (int, float)) else list(eps)
        if not eps_list:
            raise ValueError('eps must be a number or a non-empty list')
        self.attack_cfgs = [dict(cfg) for cfg in attacks]
        self.eps_list = [float(e) for e in eps_list]
        self.attacks = OrderedDict()  # eps key -> list of built attacks
        for e in self.eps_list:
            built = []
            for cfg in self.attack_cfgs:
                cfg = dict(cfg)
                if 'eps' in cfg:
                    raise ValueError(
                        f'set eps on the loop (eps={self.eps_list}), not in the '
                        f'attack config {cfg}')
                cfg['eps'] = e
                built.append(ATTACKS.build(cfg))
            self.attacks[eps_key(e)] = built
        self.seed = int(seed)
        self.resume = resume
        self.log_interval = max(1, int(log_interval))
        self.cache: Optional[ResultCache] = None
        self.example_eps: Optional[str] = None  # set by request_examples

    def request_examples(self, eps: Optional[float] = None) -> str:
        """Keep each attacked image's worst adversarial example for the hooks.

        From then on the outputs of every iteration carry, per image attacked in
        this run, ``example``: the clean and adversarial image, the ground truth
        and both predictions, from the attack (SEA member) with the lowest pixel
        accuracy at radius ``eps`` (default: the largest). Used by
        :class:`~mmseg_robust.engine.AdversarialVisualizationHook`; images
        restored from the robustness cache are not attacked again and carry none.

        Returns:
            str: the eps key the examples are taken at.
        """
        key = eps_key(max(self.eps_list) if eps is None else eps)
        if key not in self.attacks:
            raise ValueError(
                f'examples requested at eps {eps} but the loop attacks at eps '
                f'{self.eps_list}; choose one of these')
        self.example_eps = key
        return key

    # ------------------------------------------------------------------ cache
    def _description(self) -> dict:
        cfg = self.runner.cfg
        load_from = getattr(self.runner, '_load_from', None)
        ckpt = None
        if load_from and osp.isfile(load_from):
            ckpt = dict(path=osp.abspath(load_from),
                        size=osp.getsize(load_from))
        return dict(
            model=cfg.get('model'),
            checkpoint=ckpt or load_from,
            attacks=self.attack_cfgs,
            eps=self.eps_list,
            seed=self.seed)

    def _open_cache(self) -> None:
        if not self.resume:
            return
        description = self._description()
        folder = osp.join(self.runner.work_dir, 'robustness_cache',
                          fingerprint(description))
        mkdir_or_exist(folder)
        self.cache = ResultCache(folder, get_rank(), description)
        if len(self.cache):
            print_log(
                f'Resuming the robustness evaluation: {len(self.cache)} images '
                f'already done in {folder}',
                logger='current')

    # ----------------------------------------------------------------- attack
    def _attack_batch(self, view: SegmentorPixelView,
                      keys: List[str]) -> Tuple[list, Optional[list]]:
        """Attack one batch: the image records and, when requested
        (:meth:`request_examples`), the examples; else None."""
        labels = view.labels
        logits, clean_pred = view.predict()
        num_classes = logits.shape[1]
        if labels is None:
            raise ValueError('the robustness evaluation needs ground truth: the '
                             'test pipeline must contain LoadAnnotations')
        ignore = ignore_index_of(self.runner.model)
        clean = counts_of_batch(clean_pred, labels, num_classes, ignore)
        per_image: List[Dict[str, Dict[str, dict]]] = [
            OrderedDict() for _ in keys
        ]
        seeds = [image_seed(self.seed, k) for k in keys]
        # worst example per image at example_eps: [accuracy, attack, adv, pred]
        worst = [[2.0, None, None, None] for _ in keys]
        for eps_name, attacks in self.attacks.items():
            for rec in per_image:
                rec[eps_name] = OrderedDict()
            for attack in attacks:
                for name, sub, salt in _sub_attacks(attack):
                    self._log_attack(eps_name, name)
                    sub_seeds = seeds if salt is None else derive_seeds(
                        seeds, salt)
                    out = sub.run(view, view.images, labels, seeds=sub_seeds)
                    counts = counts_of_batch(out.adv_pred, labels,
                                             num_classes, ignore)
                    for rec, c in zip(per_image, counts):
                        if name in rec[eps_name]:
                            raise ValueError(
                                f'two attacks at eps {eps_name} are named '
                                f'{name}: give the attacks different settings')
                        rec[eps_name][name] = c
                    if eps_name == self.example_eps:
                        for i, (w, c) in enumerate(zip(worst, counts)):
                            acc = _accuracy(c)
                            if acc < w[0]:
                                w[:] = [acc, name, out.adv_images[i],
                                        out.adv_pred[i]]
        records = [
            image_record(k, num_classes, c, a)
            for k, c, a in zip(keys, clean, per_image)
        ]
        examples = None
        if self.example_eps is not None:
            examples = self._make_examples(view, keys, clean_pred, clean, worst)
        return records, examples

    def _make_examples(self, view, keys, clean_pred, clean, worst) -> list:
        """numpy examples (see :func:`mmseg_robust.reporting.save_example`)."""
        # the view's images are in the channel order the network sees: RGB
        # when the preprocessor converts mmcv's BGR, BGR when it does not
        rgb = bool(getattr(view.model.data_preprocessor, 'channel_conversion',
                           False))

        def to_hwc(img):
            img = img.detach().float().cpu()
            img = img if rgb else img.flip(0)
            return img.permute(1, 2, 0).contiguous().numpy()

        examples = []
        for i, (key, (acc, name, adv, pred)) in enumerate(zip(keys, worst)):
            c = clean[i]
            examples.append(
                dict(
                    name=osp.splitext(osp.basename(key))[0],
                    image=to_hwc(view.images[i]),
                    adv_image=to_hwc(adv),
                    gt=view.labels[i].cpu().numpy(),
                    clean_pred=clean_pred[i].cpu().numpy(),
                    adv_pred=pred.cpu().numpy(),
                    eps=float(self.example_eps),
                    attack=name,
                    clean_acc=_accuracy(c),
                    adv_acc=acc))
        return examples

    def _log_attack(self, eps_key: str, name: str) -> None:
        self._current = f'eps {eps_key}: {name}'
        if (self._idx + 1) % self.log_interval == 0:
            print_log(
                f'Robustness [{self._idx + 1}/{len(self.dataloader)} batches] '
                f'running {self._current}',
                logger='current')

    # ------------------------------------------------------------------- iter
    def _evaluate_iter(self, idx: int, data_batch: dict) -> List[dict]:
        self._idx = idx
        samples = data_batch['data_samples']
        keys = [_image_key(s) for s in samples]
        records = [self.cache.get(k) if self.cache else None for k in keys]
        todo = [i for i, r in enumerate(records) if r is None]
        examples = [None] * len(keys)
        if todo:
            model = self.runner.model
            model.eval()
            sub_batch = dict(
                inputs=[data_batch['inputs'][i] for i in todo],
                data_samples=[samples[i] for i in todo])
            view = SegmentorPixelView(model, sub_batch)
            new, new_examples = self._attack_batch(view,
                                                   [keys[i] for i in todo])
            if self.cache is not None:
                self.cache.put(new)
            for i, rec in zip(todo, new):
                records[i] = rec
            for i, ex in zip(todo, new_examples or []):
                examples[i] = ex
            self._attacked += len(todo)
        self._done += len(keys)
        self._log_progress(idx)
        outputs = [dict(robustness=r, img_path=k) for r, k in zip(records, keys)]
        if self.example_eps is not None:
            for out, ex in zip(outputs, examples):
                out['example'] = ex
        return outputs

    def _log_progress(self, idx: int) -> None:
        if (idx + 1) % self.log_interval and idx + 1 != len(self.dataloader):
            return
        elapsed = time.time() - self._t0
        total = len(self.dataloader.dataset)
        # this rank's share of the images still to go
        left = max(total / get_world_size() - self._done, 0)
        eta = ''
        if self._attacked:
            secs = int(elapsed / self._attacked * left)
            eta = f', ETA {secs // 3600}:{secs % 3600 // 60:02d}:{secs % 60:02d}'
        print_log(
            f'Robustness [{idx + 1}/{len(self.dataloader)} batches] images done '
            f'on this rank: {self._done} ({self._attacked} attacked, '
            f'{self._done - self._attacked} from cache), last attack '
            f'{getattr(self, "_current", "-")}{eta}',
            logger='current')

    def _check_checkpoint(self) -> None:
        """Refuse a checkpoint that does not fit the model exactly.

        mmengine loads test checkpoints with ``strict=False`` and only warns, so a
        config whose class count disagrees with the checkpoint would be evaluated
        with a randomly initialised classifier. Robustness numbers of such a model
        are meaningless: fail before attacking.
        """
        path = getattr(self.runner, '_load_from', None)
        if not path or not osp.isfile(path):
            return
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else {}
        state = {
            (k[len('module.'):] if k.startswith('module.') else k): v
            for k, v in state.items()
        }
        own = unwrap_model(self.runner.model).state_dict()
        check_state_dict(
            state, {k: v.shape
                    for k, v in own.items()},
            what=f'the checkpoint {path} (mmengine would load it partially '
            'and evaluate random weights)',
            hint='Check num_classes and the architecture in the config '
            '(convert foreign checkpoints with tools/model_converters).')

    def _run_epoch(self, stage: str, write_json: bool = True) -> dict:
        """One pass over the data with the hooks of ``stage`` ('test'/'val')."""
        self.runner.call_hook(f'before_{stage}')
        self.runner.call_hook(f'before_{stage}_epoch')
        self._start()
        for idx, data_batch in enumerate(self.dataloader):
            self.runner.call_hook(
                f'before_{stage}_iter', batch_idx=idx, data_batch=data_batch)
            outputs = self._evaluate_iter(idx, data_batch)
            self.evaluator.process(data_samples=outputs, data_batch=data_batch)
            self.runner.call_hook(
                f'after_{stage}_iter',
                batch_idx=idx,
                data_batch=data_batch,
                outputs=outputs)
        metrics = self.evaluator.evaluate(len(self.dataloader.dataset))
        self._finish(metrics, write_json)
        self.runner.call_hook(f'after_{stage}_epoch', metrics=metrics)
        self.runner.call_hook(f'after_{stage}')
        return metrics

    def _start(self) -> None:
        self._check_checkpoint()
        self._t0 = time.time()
        self._done = 0
        self._attacked = 0
        self._open_cache()

    def _finish(self, metrics: dict, write_json: bool = True) -> None:
        if self.cache is not None:
            self.cache.close()
        if get_rank() != 0 or not write_json:
            return
        summary = None
        for metric in self.evaluator.metrics:
            summary = getattr(metric, 'summary', None) or summary
        out = dict(
            metrics=metrics,
            summary=summary,
            attacks=self.attack_cfgs,
            eps=self.eps_list,
            seed=self.seed,
            checkpoint=getattr(self.runner, '_load_from', None),
            timestamp=self.runner.timestamp)
        path = osp.join(self.runner.work_dir,
                        f'robustness_{self.runner.timestamp}.json')
        with open(path, 'w') as f:
            json.dump(out, f, indent=1, default=float)
        print_log(f'Robustness results written to {path}', logger='current')


@LOOPS.register_module()
class AdversarialTestLoop(_AdversarialEvalMixin, TestLoop):
    """Test loop that evaluates robustness under attacks (SEA and single attacks).

    Select it in a config, with :class:`~mmseg_robust.evaluation.RobustnessMetric`
    as ``test_evaluator``::

        test_cfg = dict(type='AdversarialTestLoop', eps=[4, 8],
                        attacks=[dict(type='SEA', n_iter=300, class_weights='voc')])
        test_evaluator = dict(type='RobustnessMetric')

    or with ``tools/test.py CFG CKPT --cfg-options evaluator=SEA``.

    Args:
        runner, dataloader, evaluator: as :class:`mmengine.runner.TestLoop`.
        attacks, eps, seed, resume, log_interval: see
            :class:`_AdversarialEvalMixin`.
    """

    def __init__(self,
                 runner,
                 dataloader,
                 evaluator,
                 attacks,
                 eps=8,
                 seed: int = 0,
                 resume: bool = True,
                 log_interval: int = 1) -> None:
        TestLoop.__init__(self, runner, dataloader, evaluator, fp16=False)
        self._setup(attacks, eps, seed, resume, log_interval)

    def run(self) -> dict:
        return self._run_epoch('test')


@LOOPS.register_module()
class AdversarialValLoop(_AdversarialEvalMixin, ValLoop):
    """Validation loop with attacks, e.g. to monitor robustness during training::

        val_cfg = dict(type='AdversarialValLoop', eps=4,
                       attacks=[dict(type='PGD', steps=5)], resume=False)
        val_evaluator = dict(type='RobustnessMetric', worst_case_modes=['best'])

    The model is put back in train mode by the train loop afterwards, as with
    mmengine's ``ValLoop``. ``resume`` defaults to False here: the weights change
    between validations.
    """

    def __init__(self,
                 runner,
                 dataloader,
                 evaluator,
                 attacks,
                 eps=8,
                 seed: int = 0,
                 resume: bool = False,
                 log_interval: int = 10) -> None:
        ValLoop.__init__(self, runner, dataloader, evaluator, fp16=False)
        self._setup(attacks, eps, seed, resume, log_interval)

    def run(self) -> dict:
        return self._run_epoch('val', write_json=False)
