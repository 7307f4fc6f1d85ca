"""``evaluator=...`` presets: turn any mmseg config into a robustness evaluation.

``tools/test.py CFG CKPT --cfg-options evaluator=SEA`` (or ``evaluator.type=SEA
evaluator.eps=4,8 evaluator.n_iter=100 evaluator.seed=1``) replaces the config's
``test_cfg``/``test_evaluator`` by an :class:`AdversarialTestLoop` with the preset's
attacks and a :class:`RobustnessMetric`. :func:`apply_robustness_evaluator` does
it, so Python users can call it on their own configs too.
"""
import copy
from typing import Optional

import numpy as np
import torch
from mmengine.config import Config, ConfigDict

from mmseg_robust.attacks.objectives import (class_weights_from_counts,
                                             count_label_pixels)

__all__ = [
    'EVALUATOR_PRESETS', 'add_adversarial_visualization',
    'apply_robustness_evaluator', 'dataset_class_weights',
    'is_robustness_evaluation', 'normalize_evaluator_options'
]

#: name -> (attack config, name of its iteration argument). Iteration counts
#: follow the SEA paper (300 for SEA's APGD runs, 100 for single attacks).
EVALUATOR_PRESETS = {
    'SEA': (dict(type='SEA', n_iter=300), 'n_iter'),
    'APGD': (dict(type='APGD', n_iter=100, loss='CE'), 'n_iter'),
    'PGD': (dict(type='PGD', steps=100, loss='CE', best_iterate=True), 'steps'),
    'SegPGD': (dict(type='PGD', steps=100, loss='SegPGD',
                    best_iterate=True), 'steps'),
    'CosPGD': (dict(type='PGD', steps=100, loss='CosPGD',
                    best_iterate=True), 'steps'),
}
DEFAULT_EPS = [4, 8]
_OPTIONS = ('type', 'eps', 'n_iter', 'seed', 'class_weights', 'resume',
            'worst_case_modes', 'norm', 'log_interval')


def dataset_class_weights(dataset_cfg: dict, num_classes: int,
                          ignore_index: int = 255) -> list:
    """Mask-CE-Bal weights computed from a dataset's annotations (section 2.1):
    normalised inverse pixel frequency, through the dataset's own label loading
    (label map, ``reduce_zero_label``)."""
    from mmengine.registry import init_default_scope

    from mmseg_robust.registry import DATASETS
    init_default_scope('mmseg')
    cfg = copy.deepcopy(dict(dataset_cfg))
    cfg['pipeline'] = [dict(type='LoadAnnotations')]
    dataset = DATASETS.build(cfg)
    total = torch.zeros(num_classes, dtype=torch.long)
    for i in range(len(dataset)):
        seg = dataset[i]['gt_seg_map']
        total += count_label_pixels(
            torch.from_numpy(np.asarray(seg)), num_classes, ignore_index)
    return class_weights_from_counts(total).tolist()


def _num_classes(cfg: Config) -> int:
    head = cfg.model.get('decode_head')
    if isinstance(head, (list, tuple)):
        head = head[-1]
    if head is None or 'num_classes' not in head:
        raise ValueError('cannot find model.decode_head.num_classes in the config')
    return int(head['num_classes'])


def _sea_class_weights(cfg: Config) -> object:
    """The Mask-CE-Bal weights SEA should use for this config's dataset."""
    num_classes = _num_classes(cfg)
    dataset = cfg.get('test_dataloader', {}).get('dataset', {})
    kind = str(dataset.get('type', ''))
    if num_classes == 21 and 'VOC' in kind.upper():
        return 'voc'
    if num_classes == 151:
        return 'ade20k'  # the SEA/PIR-AT 151-class ADE20K protocol
    train = cfg.get('train_dataloader', {}).get('dataset')
    if not train:
        raise ValueError(
            'SEA needs Mask-CE-Bal class weights and this config has no '
            'train_dataloader to compute them from: pass '
            "evaluator.class_weights='voc'|'ade20k'|[w_0,...,w_K-1]")
    return dataset_class_weights(train, num_classes)


def apply_robustness_evaluator(cfg: Config,
                               spec: Optional[object] = None) -> Config:
    """Expand ``cfg.evaluator`` (or ``spec``) into test_cfg/test_evaluator.

    Args:
        cfg (Config): a full mmseg config; modified in place and returned.
        spec (str | dict, optional): ``'SEA'`` or ``dict(type='SEA', eps=[4, 8],
            n_iter=300, seed=0, class_weights=None, norm='Linf', resume=True,
            worst_case_modes=['best', 'reference'])``. Defaults to
            ``cfg.evaluator``; nothing happens when both are missing.

    Returns:
        Config: ``cfg``.
    """
    if spec is None:
        spec = cfg.pop('evaluator', None)
    if spec is None:
        return cfg
    spec = dict(type=spec) if isinstance(spec, str) else dict(spec)
    unknown = sorted(set(spec) - set(_OPTIONS))
    if unknown:
        raise ValueError(f'unknown evaluator option(s) {unknown}; allowed: '
                         f'{list(_OPTIONS)}')
    name = spec.get('type')
    if name not in EVALUATOR_PRESETS:
        raise ValueError(f'unknown evaluator {name!r}; choose one of '
                         f'{sorted(EVALUATOR_PRESETS)}')
    attack, iter_arg = copy.deepcopy(EVALUATOR_PRESETS[name])
    if spec.get('n_iter') is not None:
        attack[iter_arg] = int(spec['n_iter'])
    if spec.get('norm') is not None:
        attack['norm'] = spec['norm']
    if name == 'SEA':
        weights = spec.get('class_weights')
        attack['class_weights'] = weights if weights is not None else \
            _sea_class_weights(cfg)
    eps = spec.get('eps', DEFAULT_EPS)
    eps = [eps] if isinstance(eps, (int, float)) else list(eps)
    seed = int(spec.get('seed', 0))
    cfg.test_cfg = ConfigDict(
        type='AdversarialTestLoop',
        attacks=[attack],
        eps=eps,
        seed=seed,
        resume=bool(spec.get('resume', True)),
        log_interval=int(spec.get('log_interval', 1)))
    # `evaluator.worst_case_modes=best` arrives as a string: one mode, not
    # its letters
    modes = spec.get('worst_case_modes', ['best', 'reference'])
    modes = [modes] if isinstance(modes, str) else list(modes)
    cfg.test_evaluator = ConfigDict(
        type='RobustnessMetric',
        name=name,
        seed=seed,
        worst_case_modes=modes)
    return cfg


def normalize_evaluator_options(options: Optional[dict]) -> Optional[dict]:
    """Let ``--cfg-options evaluator=SEA evaluator.eps=4,8`` work as written.

    mmengine merges ``evaluator=SEA`` as a string and then fails to set
    ``evaluator.eps`` inside it; with other ``evaluator.*`` options present, the
    name is passed on as ``evaluator.type`` instead.
    """
    if not options or not isinstance(options.get('evaluator'), str):
        return options
    if not any(k.startswith('evaluator.') for k in options):
        return options
    options = dict(options)
    name = options.pop('evaluator')
    options.setdefault('evaluator.type', name)
    return options


def is_robustness_evaluation(cfg: Config) -> bool:
    """Whether ``cfg``'s test loop is an adversarial one (after
    :func:`apply_robustness_evaluator`)."""
    loop = (cfg.get('test_cfg') or {}).get('type', '')
    return isinstance(loop, str) and loop.startswith('Adversarial')


def add_adversarial_visualization(cfg: Config, show_dir: str,
                                  eps: Optional[float] = None,
                                  max_images: Optional[int] = None) -> Config:
    """``--show-dir`` for a robustness evaluation: save adversarial examples
    (:class:`AdversarialVisualizationHook`) instead of mmseg's clean-image
    drawings, which would show the clean input, not the attacked one."""
    vis = cfg.get('default_hooks', {}).get('visualization')
    if vis is not None:
        vis['draw'] = False
    hooks = list(cfg.get('custom_hooks', []) or [])
    hooks.append(
        dict(type='AdversarialVisualizationHook', out_dir=show_dir, eps=eps,
             max_images=max_images))
    cfg.custom_hooks = hooks
    return cfg
