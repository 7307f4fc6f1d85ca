"""``evaluator=...``: turn any mmseg config into a robustness evaluation.

The presets are config files, ``configs/_base_/evaluators/{sea,apgd,pgd,segpgd,
cospgd}.py``, each defining ``robustness_test_cfg`` (an
:class:`AdversarialTestLoop`) and ``robustness_evaluator`` (a
:class:`RobustnessMetric`). Configs inherit them (see ``sea.py``), and
``tools/test.py CFG CKPT --cfg-options evaluator=SEA`` (or ``evaluator.type=SEA
evaluator.eps=4,8 evaluator.steps=100 evaluator.seed=1``) replaces the config's
``test_cfg``/``test_evaluator`` by the preset's, with the options applied:
:func:`apply_robustness_evaluator` does it, so Python users can call it on their
own configs too.
"""

import copy
import os.path as osp
import warnings
from typing import Optional

import numpy as np
import torch
from mmengine.config import Config, ConfigDict

from mmseg_robust.attacks.objectives import (
    class_weights_from_counts,
    count_label_pixels,
)

__all__ = [
    'EVALUATOR_PRESETS',
    'add_adversarial_visualization',
    'apply_robustness_evaluator',
    'config_dir',
    'configure_test',
    'dataset_class_weights',
    'is_corruption_evaluation',
    'is_robustness_evaluation',
    'load_evaluator_preset',
    'normalize_evaluator_options',
]

#: evaluator name -> its preset file in ``configs/_base_/evaluators/``.
EVALUATOR_PRESETS = {
    'SEA': 'sea.py',
    'APGD': 'apgd.py',
    'PGD': 'pgd.py',
    'SegPGD': 'segpgd.py',
    'CosPGD': 'cospgd.py',
    'Corruptions': 'corruptions.py',
}


def config_dir() -> str:
    """The folder of mmseg_robust's configs (``_base_/evaluators/`` holds the
    presets): ``mmseg_robust/.mim/configs`` inside an installed package (a
    wheel or ``pip install .`` copies ``configs/`` there, as mmseg ships its
    own), else the ``configs`` folder of the source tree the package is
    imported from (``pip install -e .``, or the checkout on ``PYTHONPATH``)."""
    package = osp.dirname(osp.dirname(osp.abspath(__file__)))
    shipped = osp.join(package, '.mim', 'configs')
    if osp.isdir(shipped):
        return shipped
    return osp.join(osp.dirname(package), 'configs')


_OPTIONS = (
    'type',
    'eps',
    'steps',
    'n_iter',
    'refine_steps',
    'miou_candidates',
    'seed',
    'class_weights',
    'resume',
    'worst_case_modes',
    'norm',
    'log_interval',
    'self_checks',
    'compat',
    'eps_units',
    'clean_candidate',
    'data_digest',
    'probes',
    'corruptions',
    'severities',
    'speedups',
)
#: the options of the corruption evaluation (the others are the attacks').
_CORRUPTION_OPTIONS = (
    'type',
    'corruptions',
    'severities',
    'seed',
    'resume',
    'log_interval',
    'data_digest',
)
#: attacks that take ``compat='reference'`` (docs/algorithms.md section 3.2).
_COMPAT_ATTACKS = ('SEA', 'APGD', 'APGDLargeEps')


def load_evaluator_preset(name: str) -> Config:
    """The preset config file of evaluator ``name`` (``'SEA'``, ``'PGD'``, ...)."""
    if name not in EVALUATOR_PRESETS:
        raise ValueError(
            f'unknown evaluator {name!r}; choose one of {sorted(EVALUATOR_PRESETS)}'
        )
    path = osp.join(config_dir(), '_base_', 'evaluators', EVALUATOR_PRESETS[name])
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'the evaluator preset {path} is missing: the presets are the '
            'config files configs/_base_/evaluators/*.py, which an installed '
            'mmseg_robust carries in mmseg_robust/.mim/configs/ and an editable '
            'install reads from its source tree. Reinstall mmseg_robust from '
            'its source tree (`pip install .` or a wheel built there, or '
            '`pip install -e .`; see README, Installation)'
        )
    return Config.fromfile(path)


def dataset_class_weights(
    dataset_cfg: dict, num_classes: int, ignore_index: int = 255
) -> list:
    """Mask-CE-Bal weights computed from a dataset's annotations (section 2.1):
    normalised inverse pixel frequency, through the dataset's own label loading
    (label map, ``reduce_zero_label``).

    Label values outside ``[0, num_classes)`` other than ``ignore_index`` count
    for no class; they are reported in a warning (values, pixel counts, images)
    with the fix, as they usually mean a wrong ``num_classes`` or a missing
    label map.
    """
    from mmengine.registry import init_default_scope

    from mmseg_robust.registry import DATASETS

    init_default_scope('mmseg')
    cfg = copy.deepcopy(dict(dataset_cfg))
    cfg['pipeline'] = [dict(type='LoadAnnotations')]
    dataset = DATASETS.build(cfg)
    total = torch.zeros(num_classes, dtype=torch.long)
    outside: dict = {}  # label value -> pixel count
    bad_images = 0
    for i in range(len(dataset)):
        seg = torch.from_numpy(np.asarray(dataset[i]['gt_seg_map'])).long()
        total += count_label_pixels(seg, num_classes, ignore_index)
        flat = seg.reshape(-1)
        out = flat[(flat != ignore_index) & ((flat < 0) | (flat >= num_classes))]
        if out.numel():
            bad_images += 1
            values, counts = torch.unique(out, return_counts=True)
            for v, c in zip(values.tolist(), counts.tolist()):
                outside[v] = outside.get(v, 0) + c
    if outside:
        listed = ', '.join(f'{v}: {outside[v]}' for v in sorted(outside)[:10])
        more = f' and {len(outside) - 10} more values' if len(outside) > 10 else ''
        warnings.warn(
            f'SEA class weights: {sum(outside.values())} training label pixels in '
            f'{bad_images} of {len(dataset)} images are outside [0, {num_classes}) '
            f'and not ignore_index={ignore_index} (value: pixels {listed}{more}); '
            'they count for no class. Fix: map them to a class or to '
            f'{ignore_index} in the dataset (label_map, reduce_zero_label), or '
            'check model.decode_head.num_classes; or pass '
            "evaluator.class_weights='voc'|'ade20k'|[w_0,...]."
        )
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
            "evaluator.class_weights='voc'|'ade20k'|[w_0,...,w_K-1]"
        )
    return dataset_class_weights(train, num_classes)


def apply_robustness_evaluator(cfg: Config, spec: Optional[object] = None) -> Config:
    """Expand ``cfg.evaluator`` (or ``spec``) into test_cfg/test_evaluator.

    Args:
        cfg (Config): a full mmseg config; modified in place and returned.
        spec (str | dict, optional): ``'SEA'`` or ``dict(type='SEA', eps=[4, 8],
            steps=300, seed=0, class_weights=None, norm='Linf', resume=True,
            worst_case_modes=['best', 'reference'], log_interval=1,
            self_checks=True, compat='default', eps_units=None,
            clean_candidate=False, data_digest='stat', probes=None,
            speedups=None)``;
            ``speedups=['channels_last', 'compile', 'bf16']`` (or
            comma-separated text) makes the attack's passes cheaper
            (:mod:`~mmseg_robust.models.cheaper_passes`);
            ``probes='large_radius'|'gradient_free'|True`` runs the opt-in
            probes of the attack outcome (docs/flags.md); ``eps_units='255'``
            confirms eps in /255 units (no unit warnings);
            ``clean_candidate=True`` counts the clean image in the worst case
            (docs/algorithms.md section 4);
            ``refine_steps=R`` and ``miou_candidates=True`` (SEA only) add
            its refinement stage and its members' mIoU candidates
            (docs/algorithms.md sections 4.1 and 4.2; not the published SEA);
            ``data_digest='content'`` makes the result cache compare the data
            files by their bytes (default: sizes and mtimes, see
            :mod:`mmseg_robust.engine.result_cache`);
            ``compat='reference'`` turns
            on every behaviour of the SEA reference (its APGD and its worst-case
            greedy, reported first); options left out keep the preset's values
            (``n_iter`` is an alias of ``steps``). Defaults to
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
        raise ValueError(
            f'unknown evaluator option(s) {unknown}; allowed: {list(_OPTIONS)}'
        )
    name = spec.get('type')
    preset = load_evaluator_preset(name)
    test_cfg = copy.deepcopy(preset.robustness_test_cfg.to_dict())
    metric = copy.deepcopy(preset.robustness_evaluator.to_dict())
    if test_cfg['type'] == 'CorruptionTestLoop':
        return _apply_corruption_options(cfg, spec, test_cfg, metric)
    if 'corruptions' in spec or 'severities' in spec:
        raise ValueError(
            f'evaluator.corruptions and evaluator.severities are options of '
            f'evaluator=Corruptions, not of evaluator={name}'
        )
    attack = test_cfg['attacks'][0]
    steps = spec.get('steps', spec.get('n_iter'))
    if (
        spec.get('steps') is not None
        and spec.get('n_iter') is not None
        and spec['steps'] != spec['n_iter']
    ):
        raise ValueError(
            f'evaluator.steps={spec["steps"]} and evaluator.n_iter='
            f'{spec["n_iter"]} disagree (n_iter is an alias)'
        )
    if steps is not None:
        attack['steps'] = int(steps)
    if spec.get('refine_steps') is not None:
        # SEA's refinement stage (docs/algorithms.md section 4.1)
        if attack['type'] != 'SEA':
            raise ValueError(
                f'evaluator.refine_steps is an option of SEA (its refinement '
                f'stage), not of evaluator={name}'
            )
        attack['refine_steps'] = int(spec['refine_steps'])
    if spec.get('miou_candidates') is not None:
        # every member's mIoU candidate (docs/algorithms.md section 4.2)
        if attack['type'] != 'SEA':
            raise ValueError(
                f'evaluator.miou_candidates is an option of SEA (its members '
                f'mIoU candidates), not of evaluator={name}'
            )
        attack['miou_candidates'] = _as_bool(
            spec['miou_candidates'], 'evaluator.miou_candidates'
        )
    if spec.get('norm') is not None:
        attack['norm'] = spec['norm']
    if spec.get('eps_units') is not None:
        # '255' confirms eps in /255 units: no unit warnings (docs/flags.md)
        attack['eps_units'] = str(spec['eps_units'])
    if attack['type'] == 'SEA' and attack.get('class_weights') is None:
        weights = spec.get('class_weights')
        attack['class_weights'] = (
            weights if weights is not None else _sea_class_weights(cfg)
        )
    if 'eps' in spec:
        eps = spec['eps']
        test_cfg['eps'] = [eps] if isinstance(eps, (int, float)) else list(eps)
    if 'seed' in spec:
        test_cfg['seed'] = metric['seed'] = int(spec['seed'])
    _apply_loop_options(spec, test_cfg)
    if 'speedups' in spec:
        # cheaper passes (docs/algorithms.md section 1); unknown names fail
        # here, not in the Runner
        from mmseg_robust.models.cheaper_passes import resolve_speedups

        test_cfg['speedups'] = list(resolve_speedups(spec['speedups']))
    if 'clean_candidate' in spec:
        # the clean image as a worst-case candidate (docs/algorithms.md sec. 4)
        metric['clean_candidate'] = _as_bool(
            spec['clean_candidate'], 'evaluator.clean_candidate'
        )
    if spec.get('probes') not in (None, False):
        # the opt-in probes of the attack outcome (docs/flags.md)
        from mmseg_robust.evaluation.probes import probe_settings

        probes = spec['probes']
        if isinstance(probes, str) and probes.strip().lower() in ('true', 'all'):
            probes = True
        probe_settings(probes)  # unknown names fail here, not in the Runner
        test_cfg['probes'] = probes
    if 'self_checks' in spec:
        # docs/flags.md: on unless turned off
        test_cfg['self_checks'] = _as_bool(spec['self_checks'], 'evaluator.self_checks')
    compat = spec.get('compat', 'default')
    if compat not in ('default', 'reference'):
        raise ValueError(
            f"evaluator.compat must be 'default' or 'reference', got {compat!r}"
        )
    if compat == 'reference':
        # the SEA reference's behaviour everywhere: its APGD (accuracy-0 images
        # and the first step-size window, docs/algorithms.md section 3.2) and its
        # worst-case greedy (section 4) as the reported worst-case mIoU
        if attack['type'] in _COMPAT_ATTACKS:
            attack['compat'] = 'reference'
        metric['worst_case_modes'] = ['reference', 'best']
    if 'worst_case_modes' in spec:
        # `evaluator.worst_case_modes=best` arrives as a string: one mode, not
        # its letters
        modes = spec['worst_case_modes']
        metric['worst_case_modes'] = [modes] if isinstance(modes, str) else list(modes)
    cfg.test_cfg = ConfigDict(test_cfg)
    cfg.test_evaluator = ConfigDict(metric)
    _drop_clean_visualization(cfg)
    return cfg


def _apply_loop_options(spec: dict, test_cfg: dict) -> None:
    """The options every evaluation loop takes: ``resume``, ``log_interval``
    and ``data_digest`` (how the result cache compares the data files:
    ``'stat'`` or ``'content'``)."""
    if 'resume' in spec:
        test_cfg['resume'] = _as_bool(spec['resume'], 'evaluator.resume')
    if 'log_interval' in spec:
        test_cfg['log_interval'] = int(spec['log_interval'])
    if 'data_digest' in spec:
        from .result_cache import DATA_DIGESTS

        if spec['data_digest'] not in DATA_DIGESTS:
            raise ValueError(
                f'evaluator.data_digest must be one of {DATA_DIGESTS}, got '
                f'{spec["data_digest"]!r}'
            )
        test_cfg['data_digest'] = spec['data_digest']


def _apply_corruption_options(
    cfg: Config, spec: dict, test_cfg: dict, metric: dict
) -> Config:
    """``evaluator=Corruptions``: its options (``corruptions``,
    ``severities``, ``seed``, ``resume``, ``log_interval``, ``data_digest``)
    into the preset's test loop, which replaces the config's."""
    from mmseg_robust.datasets.corruptions import (
        resolve_corruptions,
        resolve_severities,
    )

    wrong = sorted(set(spec) - set(_CORRUPTION_OPTIONS))
    if wrong:
        raise ValueError(
            f'evaluator=Corruptions does not take {wrong} (attack options); its '
            f'options are {list(_CORRUPTION_OPTIONS[1:])}'
        )
    if 'corruptions' in spec:
        test_cfg['corruptions'] = resolve_corruptions(spec['corruptions'])
    if 'severities' in spec:
        test_cfg['severities'] = resolve_severities(spec['severities'])
    if 'seed' in spec:
        test_cfg['seed'] = int(spec['seed'])
    _apply_loop_options(spec, test_cfg)
    cfg.test_cfg = ConfigDict(test_cfg)
    cfg.test_evaluator = ConfigDict(metric)
    _drop_clean_visualization(cfg, force=True)
    return cfg


def is_corruption_evaluation(cfg: Config) -> bool:
    """Whether ``cfg``'s test loop is the corruption evaluation."""
    return (cfg.get('test_cfg') or {}).get('type') == 'CorruptionTestLoop'


def _drop_clean_visualization(cfg: Config, force: bool = False) -> None:
    """Remove mmseg's ``SegVisualizationHook`` from a robustness evaluation when
    it draws nothing (``draw=False``, which also makes it warn in every log), or
    always (``force``: ``--show-dir`` saves the adversarial pictures instead; the
    stock hook would draw the clean input)."""
    hooks = cfg.get('default_hooks') or {}
    vis = hooks.get('visualization')
    if vis is not None and (force or not vis.get('draw', False)):
        hooks.pop('visualization')


def _as_bool(value, what: str) -> bool:
    """A bool from a config value (``--cfg-options x=False`` gives a bool, but
    ``x=false`` / ``x=0`` a string or an int)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ('true', '1', 'yes'):
        return True
    if text in ('false', '0', 'no'):
        return False
    raise ValueError(f'{what} must be True or False, got {value!r}')


def configure_test(
    cfg: Config,
    show: bool = False,
    show_dir: Optional[str] = None,
    tta: bool = False,
) -> bool:
    """What ``tools/test.py`` adds to mmseg's test: the ``evaluator=...``
    presets (:func:`apply_robustness_evaluator`), ``--show-dir`` saving the
    adversarial examples of a robustness evaluation, and the check that the
    checkpoint fits the model (:class:`CheckpointCheckHook`).

    ``--tta`` (``tta=True``; mmseg's test-time augmentation, ``tta_pipeline``
    and ``tta_model`` of the config) is refused with an attack evaluator: the
    augmented views (rescaled, flipped) are made by the data pipeline from the
    decoded image, before the model, so there is no one pixel image whose
    perturbation reaches every view. An attack would perturb each view on its
    own, within eps of that view: not the threat model of docs/algorithms.md
    section 1 (one perturbation of the image), and not a bound on the robustness
    of the augmented prediction.

    Returns:
        bool: whether ``cfg`` is now a robustness evaluation (mmseg's own
        visualization of ``--show``/``--show-dir`` is then not wanted).
    """
    apply_robustness_evaluator(cfg)
    hooks = list(cfg.get('custom_hooks', []) or [])
    if not any(h.get('type') == 'CheckpointCheckHook' for h in hooks):
        cfg.custom_hooks = hooks + [dict(type='CheckpointCheckHook')]
    robust = is_robustness_evaluation(cfg)
    if is_corruption_evaluation(cfg):
        if tta:
            raise SystemExit(
                '--tta is not supported with evaluator=Corruptions (the '
                'corruption passes use the test pipeline); run --tta without it'
            )
        if show or show_dir:
            raise SystemExit(
                '--show/--show-dir are not supported with evaluator=Corruptions: '
                'write the corrupted images with '
                'tools/dataset_converters/make_corrupted.py and look at them, '
                'or run tools/test.py --show-dir on the set it writes'
            )
        return True
    if tta and robust:
        raise SystemExit(
            '--tta is not supported with an attack evaluator: the test-time '
            'augmentations (rescaled and flipped copies of the image) are made '
            'by the data pipeline before the model, so no single perturbation '
            'of the image reaches every augmented view, and attacking each view '
            'on its own is not an eps-bounded attack on the image. Evaluate the '
            'robustness without --tta; run --tta without evaluator=... for the '
            'clean numbers with test-time augmentation.'
        )
    if tta and not (cfg.get('tta_pipeline') and cfg.get('tta_model')):
        raise SystemExit(
            '--tta needs `tta_pipeline` and `tta_model` in the config (as in '
            "mmseg's dataset configs and default runtime, e.g. "
            "tta_model = dict(type='SegTTAModel')); this config lacks "
            + ' and '.join(k for k in ('tta_pipeline', 'tta_model') if not cfg.get(k))
        )
    if not robust:
        return False
    if show:
        raise SystemExit(
            '--show is not supported with an attack evaluator; use '
            '--show-dir DIR to save the adversarial examples'
        )
    if show_dir:
        add_adversarial_visualization(cfg, show_dir)
    return True


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


def add_adversarial_visualization(
    cfg: Config,
    show_dir: str,
    eps: Optional[float] = None,
    max_images: Optional[int] = None,
) -> Config:
    """``--show-dir`` for a robustness evaluation: save adversarial examples
    (:class:`AdversarialVisualizationHook`) instead of mmseg's clean-image
    drawings, which would show the clean input, not the attacked one."""
    _drop_clean_visualization(cfg, force=True)
    hooks = list(cfg.get('custom_hooks', []) or [])
    hooks.append(
        dict(
            type='AdversarialVisualizationHook',
            out_dir=show_dir,
            eps=eps,
            max_images=max_images,
        )
    )
    cfg.custom_hooks = hooks
    return cfg
