"""Adversarial attacks on semantic segmentation in pixel space (docs/algorithms.md
sections 1-4). Pure torch: no Runner imports.

Importing this package registers

- attacks into ``mmseg_robust.registry.ATTACKS``: ``FGSM``, ``BIM``, ``PGD``,
  ``APGD``, ``APGDLargeEps``, ``SEA``,
  ``PAdam`` (and, with adv-lib, ``ALMAProx``, ``DAG``, ``PDPGD``);
- objectives into ``mmseg_robust.registry.OBJECTIVES``: ``CE``, ``Mask-CE``,
  ``Mask-CE-Bal``, ``JS-Avg``, ``SegPGD``, ``CosPGD``, ``Mask-Sph``,
  ``Tsallis-CE``.

Example:
    >>> attack = ATTACKS.build(dict(type='APGD', eps=8, n_iter=100, loss='Mask-CE'))
    >>> out = attack.run(model, images, labels)  # out.adv_images, out.adv_pred
"""

from .apgd import (
    APGD,
    APGDLargeEps,
    APGDStepSizeControl,
    apgd_checkpoints,
    apgd_run,
    radius_schedule,
    step_size_halving,
)
from .attack_warning import AttackWarning
from .base import Attack, AttackOutput, SegmentationTarget
from .minimal_norm import (
    DAG,
    PDPGD,
    ALMAProx,
    MinimalNormAttack,
    MinimalNormOutput,
    import_adv_lib,
)
from .objectives import (
    OBJECTIVE_NAMES,
    BalancedMaskedCrossEntropy,
    CosPGDLoss,
    CrossEntropy,
    JensenShannonDivergence,
    MaskedCrossEntropy,
    MaskedSphericalLoss,
    Objective,
    SegPGDLoss,
    TsallisCrossEntropy,
    build_objective,
    class_weights_from_counts,
    count_label_pixels,
    load_class_weights,
    objective_names,
)
from .padam import PAdam
from .pgd import BIM, FGSM, PGD
from .sea import SEA, SEA_LOSSES, derive_seeds
from .seg_logits import (
    SegLogits,
    check_labels,
    effective_valid,
    num_correct,
)
from .square import Square
from .threat_model import (
    EPS_UNITS,
    NORMS,
    ThreatModel,
    canonical_norm,
    check_eps,
    check_eps_units,
)

__all__ = [
    'ALMAProx',
    'APGD',
    'DAG',
    'MinimalNormAttack',
    'MinimalNormOutput',
    'PDPGD',
    'import_adv_lib',
    'BIM',
    'FGSM',
    'EPS_UNITS',
    'NORMS',
    'OBJECTIVE_NAMES',
    'PAdam',
    'PGD',
    'SEA',
    'SEA_LOSSES',
    'Square',
    'APGDLargeEps',
    'APGDStepSizeControl',
    'Attack',
    'AttackOutput',
    'AttackWarning',
    'BalancedMaskedCrossEntropy',
    'CosPGDLoss',
    'CrossEntropy',
    'JensenShannonDivergence',
    'MaskedCrossEntropy',
    'MaskedSphericalLoss',
    'Objective',
    'SegLogits',
    'SegPGDLoss',
    'SegmentationTarget',
    'ThreatModel',
    'TsallisCrossEntropy',
    'apgd_checkpoints',
    'apgd_run',
    'build_objective',
    'canonical_norm',
    'check_eps',
    'check_eps_units',
    'check_labels',
    'class_weights_from_counts',
    'count_label_pixels',
    'derive_seeds',
    'effective_valid',
    'load_class_weights',
    'num_correct',
    'objective_names',
    'radius_schedule',
    'step_size_halving',
]
