from .compat import apply_compat, runner_checkpoint_safe_globals

__all__ = ['apply_compat', 'runner_checkpoint_safe_globals']
