"""mmseg_robust: adversarial robustness evaluation (SEA) and adversarial training
(PIR-AT, SAT, DDC-AT) for MMSegmentation 1.x.

Importing the package registers every component into mmseg's registries (and the
``ATTACKS`` registry of :mod:`mmseg_robust.registry`) and applies the narrow
compatibility fixes of :mod:`mmseg_robust.utils.compat`. Enable it in a config with::

    custom_imports = dict(imports=['mmseg_robust'], allow_failed_imports=False)
"""

from .utils.compat import apply_compat
from .version import __version__

apply_compat()

from . import attacks, datasets, engine, evaluation, models  # noqa: E402,F401,I001

__all__ = ['__version__']
