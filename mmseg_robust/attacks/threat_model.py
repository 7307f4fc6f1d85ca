"""Threat model: L-inf / L2 balls in pixel space (docs/algorithms.md section 1).

Images are float tensors ``(B, C, H, W)`` with values in ``[0, 1]``. Radii are given in
/255 units (``eps=8`` means ``8/255``), the unit of every public attack argument; the
helpers here take an optional ``radius`` already converted to ``[0, 1]`` units, which
is what the optimisers pass around.
"""

import math
import warnings
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .attack_warning import AttackWarning

__all__ = [
    'EPS_UNITS',
    'NORMS',
    'ThreatModel',
    'canonical_norm',
    'check_eps',
    'check_eps_units',
    'looks_like_unit_interval',
    'make_generators',
]

#: Canonical names of the supported threat models.
NORMS = ('Linf', 'L2')

_NORM_ALIASES = {'linf': 'Linf', 'inf': 'Linf', 'l2': 'L2'}

# Guards divisions by a norm; far below any meaningful L2 radius in [0, 1] units.
_TINY = 1e-12


def canonical_norm(norm: str) -> str:
    """Return ``'Linf'`` or ``'L2'`` for a case-insensitive norm name.

    Raises:
        ValueError: for any other value, naming the allowed values.
    """
    key = norm.strip().lower() if isinstance(norm, str) else None
    if key not in _NORM_ALIASES:
        raise ValueError(
            f"norm must be 'Linf' (also 'linf', 'inf') or 'L2' (also 'l2'), "
            f'got {norm!r}'
        )
    return _NORM_ALIASES[key]


#: ``eps_units`` values that confirm a radius in /255 units (no plausibility
#: warnings); ``None`` (the default) means /255 units too, checked.
EPS_UNITS = ('255', '/255')

#: L-inf: an eps below 1 warns when ``eps * 255`` is within this relative distance
#: of an integer ``n`` with ``1 <= n <= LINF_CONFUSION_MAX`` (the radius was
#: likely given in [0, 1] units, e.g. ``8/255`` meaning ``eps=8``).
LINF_CONFUSION_RTOL = 0.05
LINF_CONFUSION_MAX = 16
#: L2: a radius whose root-mean-square per coordinate, ``eps / sqrt(C*H*W)`` in
#: /255 units, is below this warns (the radius was likely given in [0, 1] units).
L2_MIN_RMS = 0.05


def check_eps_units(eps_units) -> Optional[str]:
    """``None`` (unconfirmed /255 units) or ``'255'`` (confirmed /255 units).

    Raises:
        ValueError: for any other value, naming the allowed ones.
    """
    if eps_units is None:
        return None
    text = str(eps_units).strip()
    if text in EPS_UNITS:
        return '255'
    raise ValueError(
        f"eps_units must be '255' (eps is in /255 units, confirmed: no unit "
        f'warnings) or None (/255 units, checked), got {eps_units!r}; eps is '
        'always in /255 units: give a radius r in [0, 1] units as eps=r*255'
    )


def check_eps(eps: float, norm: Optional[str] = None, eps_units=None) -> float:
    """Validate a radius in /255 units: a finite number >= 0.

    ``eps=0`` is allowed (the clean images). With ``eps_units=None`` a radius
    that looks like [0, 1] units warns (docs/flags.md, ``attack_warning``):
    for L-inf, an ``eps < 1`` whose ``eps * 255`` is within 5% of an integer
    from 1 to 16 (``eps=8/255`` or ``0.03`` for ``eps=8``); legitimate radii
    below one grey level such as ``0.25`` or ``0.5`` do not warn. L2 radii are
    checked against the image size when an attack runs
    (:meth:`ThreatModel.check_size`). ``eps_units='255'`` confirms the value: no
    warning. For L-inf (``norm``), ``eps > 255`` is an error: the ball would be
    larger than the whole pixel range (for L2 the pixel range's diameter depends
    on the image size, so no bound is checked).

    Raises:
        ValueError: not a number, negative, not finite, L-inf ``eps > 255``, or
            an unknown ``eps_units``.
    """
    eps_units = check_eps_units(eps_units)
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ValueError(
            f'eps must be a number in /255 units (eps=8 means 8/255), got {eps!r}'
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f'eps must be finite and >= 0 (in /255 units, eps=8 means 8/255), '
            f'got {eps!r}'
        )
    linf = norm is None or canonical_norm(norm) == 'Linf'
    if norm is not None and linf and value > 255:
        raise ValueError(
            f'eps={value:g} is larger than the whole pixel range: eps is in /255 '
            f'units (eps=8 means 8/255), so an L-inf eps above 255 allows any image; '
            f'did you mean eps={value / 255:g}?'
        )
    if eps_units is None and linf and looks_like_unit_interval(value):
        warnings.warn(
            f'eps is in /255 units: eps={value:g} means {value:g}/255; did you '
            f'mean eps={value * 255:.4g} ({value * 255:.4g}/255)? If {value:g}/255 '
            "is intended, pass eps_units='255' to confirm it.",
            AttackWarning,
            stacklevel=3,
        )
    return value


def looks_like_unit_interval(eps: float) -> bool:
    """Whether an L-inf ``eps`` in /255 units was likely meant in [0, 1] units:
    ``0 < eps < 1`` and ``eps * 255`` within 5% of an integer from 1 to 16 (the
    usual L-inf radii, 1/255 to 16/255)."""
    if not 0 < eps < 1:
        return False
    scaled = eps * 255
    n = round(scaled)
    return 1 <= n <= LINF_CONFUSION_MAX and abs(scaled - n) <= LINF_CONFUSION_RTOL * n


def make_generators(seeds: Sequence[int]) -> List[torch.Generator]:
    """One CPU ``torch.Generator`` per image, seeded with that image's seed.

    Drawing each image's noise from its own generator makes random starts independent
    of batch composition and of the global RNG (multi-process evaluation then runs
    the same attack on every image as single-process evaluation).
    """
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class ThreatModel:
    """L-inf or L2 ball of radius ``eps/255`` around a clean image, intersected with
    the pixel range ``[0, 1]`` (docs/algorithms.md section 1).

    Args:
        eps (float): radius in /255 units (``eps=8`` is ``8/255``). Default: 8.
        norm (str): ``'Linf'`` or ``'L2'`` (case-insensitive, ``'inf'`` accepted).
            Default: ``'Linf'``.
        eps_units (str, optional): ``'255'`` confirms that ``eps`` is meant in
            /255 units: no unit warnings (:func:`check_eps`,
            :meth:`check_size`). Default: None (/255 units, checked).

    All methods take images ``(B, C, H, W)`` in ``[0, 1]``; ``radius`` overrides the
    radius in ``[0, 1]`` units (used by the progressive-radius schedule).

    Example:
        >>> tm = ThreatModel(eps=8, norm='Linf')
        >>> x_adv = tm.project(x + 0.1 * torch.randn_like(x), x)
    """

    def __init__(self, eps: float = 8, norm: str = 'Linf', eps_units=None) -> None:
        self.norm = canonical_norm(norm)
        self.eps_units = check_eps_units(eps_units)
        self.eps = check_eps(eps, self.norm, self.eps_units)
        self._size_checked = False

    @property
    def radius(self) -> float:
        """The radius in ``[0, 1]`` pixel units (``eps / 255``)."""
        return self.eps / 255.0

    def __repr__(self) -> str:
        return f'{type(self).__name__}(eps={self.eps:g}/255, norm={self.norm!r})'

    def check_size(self, shape: Sequence[int]) -> None:
        """Warn (once) when an L2 radius is implausibly small for images of
        ``shape`` ``(B, C, H, W)``: its root-mean-square per coordinate,
        ``eps / sqrt(C*H*W)`` in /255 units, is below :data:`L2_MIN_RMS` (a
        twentieth of a grey level), as when a radius meant in [0, 1] units
        (``eps=2.0`` for 2.0) is read in /255 units. Typical L2 radii give
        about 1-2/255 per coordinate. Nothing for L-inf, ``eps=0`` or
        ``eps_units='255'``."""
        if self.norm != 'L2' or self.eps_units or self.eps == 0 or self._size_checked:
            return
        self._size_checked = True
        dim = math.prod(int(s) for s in shape[1:])
        rms = self.eps / math.sqrt(max(dim, 1))
        if rms >= L2_MIN_RMS:
            return
        size = 'x'.join(str(int(s)) for s in shape[1:])
        warnings.warn(
            f'L2 eps={self.eps:g} is in /255 units ({self.eps / 255:.3g} in [0, 1] '
            f'units): on images of {size} that is {rms:.2g}/255 per coordinate '
            f'(eps/sqrt(C*H*W)), below {L2_MIN_RMS:g}/255; did you give the radius '
            f'in [0, 1] units? Then pass eps={self.eps * 255:g} (eps = r*255). If '
            f"{self.eps:g}/255 is intended, pass eps_units='255' to confirm it.",
            AttackWarning,
            stacklevel=2,
        )

    def _radius(self, radius: Optional[float]) -> float:
        return self.radius if radius is None else float(radius)

    def project(
        self, x_adv: Tensor, x: Tensor, radius: Optional[float] = None
    ) -> Tensor:
        """Project ``x_adv`` onto the ball around ``x``, then clip to ``[0, 1]``.

        Clipping after the ball projection keeps the point in the ball (each
        coordinate only moves towards ``x``), so the result is feasible for both
        norms. With radius 0 the result is exactly ``x``.
        """
        r = self._radius(radius)
        delta = x_adv - x
        if self.norm == 'Linf':
            delta = delta.clamp(-r, r)
        else:
            norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(_TINY)
            factor = (r / norms).clamp(max=1.0)
            delta = delta * factor.view(-1, *([1] * (delta.dim() - 1)))
        return (x + delta).clamp(0.0, 1.0)

    def projector(self, x: Tensor, radius: Optional[float] = None):
        """``project(., x, radius)`` as a one-argument function, for loops that
        project many points around the same ``x``.

        For L-inf the ball and the pixel range are one box, so the bounds are
        computed once and every projection is a single clamp (the same box as
        :meth:`project`, without the round trip through ``delta``).
        """
        r = self._radius(radius)
        if self.norm != 'Linf':
            return lambda x_adv: self.project(x_adv, x, r)
        lo = (x - r).clamp_(min=0.0)
        hi = (x + r).clamp_(max=1.0)
        return lambda x_adv: torch.clamp(x_adv, lo, hi)

    def direction(self, grad: Tensor) -> Tensor:
        """Steepest-ascent direction of unit norm: ``sign(grad)`` (L-inf) or
        ``grad / ||grad||_2`` per image (L2; zero gradient gives a zero step)."""
        if self.norm == 'Linf':
            return grad.sign()
        norms = grad.flatten(1).norm(p=2, dim=1).clamp_min(_TINY)
        return grad / norms.view(-1, *([1] * (grad.dim() - 1)))

    def random_start(
        self,
        x: Tensor,
        radius: Optional[float] = None,
        seeds: Optional[Sequence[int]] = None,
    ) -> Tensor:
        """A point drawn uniformly from the ball around ``x``, clipped to ``[0, 1]``.

        Args:
            x (Tensor): clean images ``(B, C, H, W)`` in ``[0, 1]``.
            radius (float, optional): radius in ``[0, 1]`` units; default ``eps/255``.
            seeds (sequence of int, optional): one seed per image. Each image's
                noise is then drawn on the CPU from its own generator and moved to
                ``x.device``; otherwise the global RNG of ``x.device`` is used.
        """
        r = self._radius(radius)
        if seeds is None:
            noise = self._sample_unit_ball(x.shape, x.device, None)
        else:
            noise = torch.cat(
                [
                    self._sample_unit_ball((1, *x.shape[1:]), torch.device('cpu'), g)
                    for g in make_generators(seeds)
                ]
            ).to(x.device)
        return (x + r * noise.to(x.dtype)).clamp(0.0, 1.0)

    def _sample_unit_ball(self, shape, device, generator) -> Tensor:
        """Uniform samples from the unit ball of the norm, float32, ``shape``."""
        if self.norm == 'Linf':
            u = torch.rand(shape, device=device, generator=generator)
            return 2.0 * u - 1.0
        # L2: uniform direction times radius u^(1/d), d = dimension of one image.
        g = torch.randn(shape, device=device, generator=generator)
        u = torch.rand(shape[0], device=device, generator=generator)
        d = math.prod(shape[1:])
        scale = u.pow(1.0 / d) / g.flatten(1).norm(p=2, dim=1).clamp_min(_TINY)
        return g * scale.view(-1, *([1] * (len(shape) - 1)))
