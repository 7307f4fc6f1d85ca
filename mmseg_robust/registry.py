"""Registries of mmseg_robust.

Components of this package register into mmsegmentation's own registries
(re-exported here), so user configs keep ``default_scope='mmseg'`` and only add
``custom_imports=dict(imports=['mmseg_robust'], allow_failed_imports=False)``.

``ATTACKS`` is the one registry of our own: adversarial attacks (threat model,
objective, optimiser) built from config dicts, e.g.
``ATTACKS.build(dict(type='PGD', eps=8))``.
Other projects import it and register their own attacks::

    from mmseg_robust.registry import ATTACKS

    @ATTACKS.register_module()
    class MyAttack(Attack):
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


#: Adversarial attacks and attack objectives. Pure torch components: building one
#: needs no Runner. ``locations`` makes ``ATTACKS.build`` import the implementations
#: on first use even when only this module was imported.
ATTACKS = Registry(
    'attack',
    scope='mmseg_robust',
    build_func=_build_in_own_scope,
    locations=['mmseg_robust.attacks'],
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
    'OPTIMIZERS',
    'OPTIM_WRAPPERS',
    'PARAM_SCHEDULERS',
    'TRAIN_SCHEMES',
    'TRANSFORMS',
    'VISUALIZERS',
    'WEIGHT_INITIALIZERS',
]
