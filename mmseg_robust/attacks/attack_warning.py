"""The warning category of the attacks."""

__all__ = ['AttackWarning']


class AttackWarning(UserWarning):
    """A warning raised by an attack (eps that looks like [0, 1] units, a model
    attacked in train mode). Filter, record or turn them into errors by
    category::

        warnings.simplefilter('error', AttackWarning)
    """
