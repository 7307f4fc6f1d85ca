"""A test hook (imported by test configs through ``custom_imports``): every
process saves the running statistics of its normalisation layers when a
validation starts, to ``<work_dir>/norm_stats_iter<N>_rank<R>.pth``."""

import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch.nn.modules.batchnorm import _NormBase


@HOOKS.register_module()
class NormStatsProbe(Hook):
    def before_val(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        stats = {}
        for name, m in model.named_modules():
            if isinstance(m, _NormBase) and m.track_running_stats:
                for key in ('running_mean', 'running_var', 'num_batches_tracked'):
                    stats[f'{name}.{key}'] = getattr(m, key).detach().clone()
        path = osp.join(
            runner.work_dir, f'norm_stats_iter{runner.iter}_rank{get_rank()}.pth'
        )
        torch.save(stats, path)
