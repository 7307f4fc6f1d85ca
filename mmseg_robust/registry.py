"""Registries of mmseg_robust.

Components of this package register into mmsegmentation's own registries
(re-exported here), so user configs keep ``default_scope='mmseg'`` and only add
``custom_imports=dict(imports=['mmseg_robust'], allow_failed_imports=False)``.

Registries of our own: ``ATTACKS``, adversarial attacks (threat model,
objective, optimiser) built from config dicts, e.g.
``ATTACKS.build(dict(type='PGD', eps=8))``; ``OBJECTIVES``, the per-pixel attack
objectives an attack's ``loss`` names, e.g. ``OBJECTIVES.build(dict(type='CE'))``;
``TRAIN_SCHEMES``, the batch compositions of adversarial training.
Other projects import them and register their own attacks and objectives::

    from mmseg_robust.registry import ATTACKS, OBJECTIVES

    @ATTACKS.register_module()
    class MyAttack(Attack):
        ...

    @OBJECTIVES.register_module(name='My-Loss')
    class MyLoss(Objective):
        ...
"""

from mmengine.registry import Registry, build_from_cfg
from mmseg.registry import (
    DATA_SAMPLERS,
    DATASETS,
    EVALUATOR,
    HOOKS,
    LOOPS,
    METRICS,
    MODEL_WRAPPERS,
    MODELS,
    OPTIM_WRAPPERS,
    OPTIMIZERS,
    PARAM_SCHEDULERS,
    TRANSFORMS,
    VISUALIZERS,
    WEIGHT_INITIALIZERS,
)


def _build_in_own_scope(cfg, registry, default_args=None):
    """Build from ``ATTACKS`` in its own scope, whatever the default scope is.

    Under a Runner the default scope is ``'mmseg'``, which has no attack registry;
    mmengine would warn and fall back to this registry anyway. Setting ``_scope_``
    (unless the config names one) goes there directly.
    """
    if hasattr(cfg, 'get') and '_scope_' not in cfg:
        cfg = type(cfg)(cfg)
        cfg['_scope_'] = registry.scope
    return build_from_cfg(cfg, registry, default_args)


def _build_attack(cfg, registry, default_args=None):
    """Build an attack; an objective's name gets an error that says where it
    belongs (an attack's ``loss``, or ``OBJECTIVES``)."""
    kind = cfg.get('type') if hasattr(cfg, 'get') else None
    if isinstance(kind, str) and kind not in registry and kind in OBJECTIVES:
        raise KeyError(
            f'{kind!r} is an attack objective, not an attack: give it as an '
            f"attack's loss (e.g. dict(type='APGD', loss={kind!r})) or build it "
            f'with mmseg_robust.registry.OBJECTIVES.build(dict(type={kind!r}))'
        )
    return _build_in_own_scope(cfg, registry, default_args)


#: Adversarial attacks. Pure torch components: building one needs no Runner.
#: ``locations`` makes ``ATTACKS.build`` import the implementations on first use
#: even when only this module was imported.
ATTACKS = Registry(
    'attack',
    scope='mmseg_robust',
    build_func=_build_attack,
    locations=['mmseg_robust.attacks'],
)

#: Attack objectives (docs/algorithms.md section 2): per-pixel losses the
#: attacks maximise, named by an attack's ``loss`` (``'CE'``, ``'Mask-CE'``, ...).
OBJECTIVES = Registry(
    'attack objective',
    scope='mmseg_robust',
    build_func=_build_in_own_scope,
    locations=['mmseg_robust.attacks.objectives'],
)

#: Batch composition schemes of adversarial training (``'pirat'``, ``'sat'``,
#: ``'ddcat'``), selected by the train loop's ``scheme``.
TRAIN_SCHEMES = Registry(
    'adversarial training scheme',
    scope='mmseg_robust',
    build_func=_build_in_own_scope,
    locations=['mmseg_robust.engine.train_schemes'],
)

__all__ = [
    'ATTACKS',
    'DATASETS',
    'DATA_SAMPLERS',
    'EVALUATOR',
    'HOOKS',
    'LOOPS',
    'METRICS',
    'MODELS',
    'MODEL_WRAPPERS',
    'OBJECTIVES',
    'OPTIMIZERS',
    'OPTIM_WRAPPERS',
    'PARAM_SCHEDULERS',
    'TRAIN_SCHEMES',
    'TRANSFORMS',
    'VISUALIZERS',
    'WEIGHT_INITIALIZERS',
]
