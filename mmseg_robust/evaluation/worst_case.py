"""SEA's worst case over attacks, from per-image counts (docs/algorithms.md sec. 4).

SEA runs several attacks independently per image and reports, per metric, the
worst case:

* aACC: each image's own pixel accuracy is minimised over the attacks, then
  averaged over the images (:func:`worst_case_aacc`);
* mIoU: it is not separable over images (IoU pools counts over the dataset), so
  one attack per image is chosen greedily to minimise the dataset mIoU
  (:func:`worst_case_miou`).

Both work on per-image, per-attack counts only (see :mod:`.counts`), never
prediction maps.
"""

import random
import statistics
from typing import Tuple

import numpy as np

from .counts import _to_numpy, miou_from_counts

#: Modes of :func:`worst_case_miou`.
WORST_CASE_MIOU_MODES = ('best', 'reference')


def worst_case_aacc(acc) -> float:
    """SEA worst-case aACC: mean over images of the minimum over attacks.

    docs/algorithms.md section 4: ``aACC_SEA = 1/N sum_i min_a acc[a, i]``, where
    ``acc[a, i]`` is image i's own pixel accuracy under attack a (not a pooled
    pixel accuracy).

    Args:
        acc (array): Per-attack, per-image pixel accuracies, shape (A, N), e.g.
            from :func:`~.counts.pixel_accuracy`.

    Returns:
        float: The worst-case aACC, a fraction in [0, 1].

    Example:
        >>> worst_case_aacc([[0.9, 0.5], [0.7, 0.6]])  # (0.7 + 0.5) / 2
        0.6
    """
    acc = _to_numpy(acc).astype(np.float64)
    if acc.ndim != 2 or acc.shape[0] == 0 or acc.shape[1] == 0:
        raise ValueError(
            f'acc must be a non-empty (num_attacks, num_images) array, got '
            f'shape {acc.shape}'
        )
    return float(acc.min(axis=0).mean())


def _as_counts(x, name: str) -> np.ndarray:
    """Validate an (A, N, K) count array and return it as int64."""
    arr = _to_numpy(x)
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(
            f'{name} must be a non-empty (num_attacks, num_images, '
            f'num_classes) array, got shape {arr.shape}'
        )
    if not np.issubdtype(arr.dtype, np.integer):
        # Counts stored as floats (as the reference does) are fine if they are
        # integral; int64 sums then make the greedy's comparisons exact.
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f'{name} must hold integer pixel counts')
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(f'{name} must hold non-negative pixel counts')
    return arr


def worst_case_miou(
    intersect,
    union,
    mode: str = 'best',
    max_rounds: int = 1000,
    tol: float = 1e-6,
    seed: int = 0,
) -> Tuple[float, np.ndarray]:
    """SEA worst-case mIoU: one attack per image, chosen to minimise the mIoU.

    Greedy local search of docs/algorithms.md section 4. With ``I[a, i, c]`` and
    ``U[a, i, c]`` the intersection and union counts of image i under attack a,
    an assignment ``s`` (one attack per image) scores ``mIoU(sum_i I[s_i, i],
    sum_i U[s_i, i])``, the mean IoU over classes with non-zero summed union.
    Exhaustive search is A^N, so:

    1. every image starts on attack 0 (Mask-CE-Bal in SEA); running sums
       RI, RU; M = mIoU;
    2. each round visits the images in a fresh seeded random order; for
       image i, the candidate of attack a is ``RI - I[s_i, i] + I[a, i]``
       (same for U), all A candidates scored in one (A, K) array operation;
       an improving candidate replaces s_i, RI, RU, M;
    3. stop after a round that lowers M by <= ``tol``, or after
       ``max_rounds`` rounds.

    Modes:

    * ``'best'`` (default): each visit takes the candidate with the lowest
      mIoU, if it is below M; the visiting order is
      ``np.random.default_rng(seed)``, a new permutation per round. Every
      accepted change lowers M, so the result is never above attack 0's pooled
      mIoU.
    * ``'reference'``: the SEA reference code's greedy, reproduced exactly
      (docs/algorithms.md section 4, quirks (i)-(iv)): (i) attacks are tried in
      order 0, 1, 2, ... and every candidate, the image's current attack
      included, is compared with the exact mIoU M from before the image's
      visit, so the image ends on the *last* qualifying attack; (ii) a
      candidate's mIoU is the mean of ``I / (U + 1e-8)`` over the classes whose
      running union (before that candidate) is non-zero, so the unchanged
      candidate always compares lower than M and an image can only move to a
      higher-index attack; (iii) at least two rounds run; (iv) the visiting
      order is Python's ``random.shuffle`` of ``range(N)`` each round, after
      ``random.seed(225)`` (``seed`` is not used). Means are taken as the
      reference takes them (``statistics.mean``). Not reproduced: the
      reference shortens its running-sum lists when a class has a zero running
      union (which misaligns the classes after it); with every class present
      in the ground truth, as on the VOC and ADE20K validation sets, that never
      happens. This greedy is weaker than ``'best'`` (reports a higher
      worst-case mIoU) on most inputs.

    Args:
        intersect (array): Intersection counts I, shape (A, N, K) (attacks,
            images, classes), integer-valued (numpy or CPU torch).
        union (array): Union counts U, same shape, ``union >= intersect``.
        mode (str): ``'best'`` or ``'reference'``, see above. Defaults to
            ``'best'``.
        max_rounds (int): Maximum number of rounds over all images. Defaults to
            1000.
        tol (float): Stop after a round that lowers the mIoU by <= tol.
            Defaults to 1e-6.
        seed (int): ``'best'``: seed of the visiting order
            (``np.random.default_rng(seed)``, a new permutation per round).
            Defaults to 0. ``'reference'`` always uses the reference's order.

    Returns:
        tuple[float, np.ndarray]: The worst-case mIoU (a fraction in [0, 1],
        nan if no class has a non-zero union) and the chosen attack per
        image, int64 array of shape (N,).

    Raises:
        ValueError: On an unknown ``mode``, mismatched or non-count inputs, or
            ``max_rounds < 1``.

    Example:
        >>> # I, U: (3, N, K) counts of SEA's three attacks
        >>> miou, choice = worst_case_miou(I, U)
        >>> np.bincount(choice, minlength=3)  # images per worst attack
    """
    if mode not in WORST_CASE_MIOU_MODES:
        raise ValueError(
            f'unknown mode {mode!r}; allowed modes: '
            f'{", ".join(repr(m) for m in WORST_CASE_MIOU_MODES)}'
        )
    if max_rounds < 1:
        raise ValueError(f'max_rounds must be >= 1, got {max_rounds}')
    inter = _as_counts(intersect, 'intersect')
    uni = _as_counts(union, 'union')
    if inter.shape != uni.shape:
        raise ValueError(
            f'intersect and union must have the same shape, got {inter.shape} '
            f'and {uni.shape}'
        )
    if np.any(inter > uni):
        raise ValueError('intersect must not exceed union (are the arguments swapped?)')
    if mode == 'reference':
        return _reference_greedy(inter, uni, max_rounds, tol)
    num_images = inter.shape[1]
    # Image-major copies: one image's (A, K) block is contiguous.
    inter_by_image = np.ascontiguousarray(inter.transpose(1, 0, 2))
    union_by_image = np.ascontiguousarray(uni.transpose(1, 0, 2))

    choice = np.zeros(num_images, dtype=np.int64)
    run_inter = inter[0].sum(axis=0)
    run_union = uni[0].sum(axis=0)
    # Scored as a one-row batch, like the candidates below, so that an
    # unchanged assignment reproduces M bit for bit and never counts as an
    # improvement.
    miou = miou_from_counts(run_inter[None], run_union[None])[0]

    rng = np.random.default_rng(seed)
    for _ in range(max_rounds):
        miou_at_round_start = miou
        for i in rng.permutation(num_images):
            cur = choice[i]
            # Candidate sums of all A attacks for image i at once: remove the
            # image's current counts, add each attack's (section 4, step 2).
            rest_inter = run_inter - inter_by_image[i, cur]
            rest_union = run_union - union_by_image[i, cur]
            cand_inter = rest_inter + inter_by_image[i]  # (A, K)
            cand_union = rest_union + union_by_image[i]
            cand_miou = miou_from_counts(cand_inter, cand_union)
            # nan (no class left) never compares lower.
            improving = cand_miou < miou
            if not improving.any():
                continue
            best = int(np.argmin(np.where(improving, cand_miou, np.inf)))
            choice[i] = best
            run_inter = cand_inter[best]
            run_union = cand_union[best]
            miou = cand_miou[best]
        if miou_at_round_start - miou <= tol:
            break
    return float(miou), choice


#: The SEA reference's seed of Python's ``random`` (its visiting order).
REFERENCE_SEED = 225


def _exact_miou(run_inter: np.ndarray, run_union: np.ndarray) -> float:
    """mIoU over the classes with non-zero union, averaged as the reference
    averages (``statistics.mean`` of the per-class IoUs)."""
    keep = run_union != 0
    return statistics.mean((run_inter[keep] / run_union[keep]).tolist())


def _reference_greedy(
    inter: np.ndarray, uni: np.ndarray, max_rounds: int, tol: float
) -> Tuple[float, np.ndarray]:
    """The reference's worst-case mIoU greedy (see :func:`worst_case_miou`,
    mode ``'reference'``), on int64 counts (A, N, K)."""
    num_attacks, num_images, _ = inter.shape
    choice = np.zeros(num_images, dtype=np.int64)
    run_inter = inter[0].sum(axis=0)
    run_union = uni[0].sum(axis=0)
    miou = _exact_miou(run_inter, run_union)
    rng = random.Random(REFERENCE_SEED)
    previous = float('inf')  # (iii): the first round never stops the search
    for _ in range(max_rounds):
        order = list(range(num_images))
        rng.shuffle(order)
        for i in order:
            before = miou  # (i): every candidate is compared with this M
            for a in range(num_attacks):
                cand_inter = run_inter - inter[choice[i], i] + inter[a, i]
                cand_union = run_union - uni[choice[i], i] + uni[a, i]
                # (ii): classes with a non-zero running union, union + 1e-8
                keep = run_union != 0
                cand = statistics.mean(
                    (cand_inter[keep] / (cand_union[keep] + 1e-8)).tolist()
                )
                if cand < before:
                    choice[i] = a
                    run_inter, run_union = cand_inter, cand_union
            miou = _exact_miou(run_inter, run_union)
        if previous - miou <= tol:
            break
        previous = miou
    return float(miou), choice
