# mmseg's runtime (hooks, logger, visualizer, default_scope='mmseg') with
# mmseg_robust's registries switched on.
_base_ = 'mmseg::_base_/default_runtime.py'

custom_imports = dict(imports=['mmseg_robust'], allow_failed_imports=False)
