"""Per-pixel quantities shared by objectives and optimisers (docs/algorithms.md,
section 2).

:class:`SegLogits` wraps one forward pass (logits at the input resolution, labels,
valid mask) and computes each derived quantity (log-probabilities, cross-entropy,
prediction, correctness, per-image accuracy) at most once, so an attack iteration
pays for a single log-softmax and a single argmax whatever the objective.
"""

from functools import cached_property
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'SegLogits',
    'check_labels',
    'effective_valid',
    'image_miou',
    'num_correct',
]


def effective_valid(
    labels: Tensor, valid: Optional[Tensor] = None, ignore_index: int = 255
) -> Tensor:
    """Pixels that count: ``valid & (labels != ignore_index)``, bool ``(B, H, W)``."""
    mask = labels != ignore_index
    if valid is not None:
        mask = mask & valid.to(torch.bool)
    return mask


def check_labels(
    labels: Tensor,
    num_classes: int,
    ignore_index: int = 255,
    valid: Optional[Tensor] = None,
) -> None:
    """Raise ``ValueError`` if a label is neither in ``[0, num_classes)`` nor
    ``ignore_index``. Pixels where ``valid`` is False (padding) are not checked.

    One device synchronisation; called once per attack, when K is known.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if valid is not None:
        bad = bad & valid.to(torch.bool)
    if bool(bad.any()):
        found = torch.unique(labels[bad]).tolist()
        shown = ', '.join(str(v) for v in found[:10])
        more = f' (and {len(found) - 10} more)' if len(found) > 10 else ''
        raise ValueError(
            f'labels contain values {shown}{more} outside [0, {num_classes}) '
            f'(the model predicts K={num_classes} classes) that are not the '
            f'ignore index {ignore_index}; map them to a class or to the ignore '
            f'index, or set ignore_index to the value your dataset uses'
        )


def num_correct(pred: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """Correctly classified valid pixels per image, long ``(B,)``."""
    return ((pred == labels) & valid).sum(dim=(1, 2))


def image_miou(pred: Tensor, labels: Tensor, valid: Tensor, num_classes: int) -> Tensor:
    """Each image's own mIoU, float64 ``(B,)``: the mean over the classes with a
    non-zero union in that image (labels or prediction, valid pixels) of
    intersection / union; 0 for an image without valid pixels.

    The score by which an attack picks its mIoU candidate (docs/algorithms.md
    section 4.2). ``labels`` must be in ``[0, num_classes)`` wherever ``valid``.
    """
    b, k = pred.shape[0], int(num_classes)
    offset = (torch.arange(b, device=pred.device) * k).view(b, 1, 1)
    gt = (labels + offset)[valid]
    n = b * k
    area_gt = torch.bincount(gt, minlength=n)
    area_pred = torch.bincount((pred + offset)[valid], minlength=n)
    inter = torch.bincount(gt[(pred == labels)[valid]], minlength=n)
    union = (area_gt + area_pred - inter).view(b, k).double()
    iou = inter.view(b, k).double() / union.clamp_min(1)
    present = (union > 0).sum(dim=1)
    return iou.sum(dim=1) / present.clamp_min(1)


class SegLogits:
    """One forward pass and the quantities derived from it, each computed lazily once.

    Args:
        logits (Tensor): ``(B, K, H, W)`` float32 at the input resolution (may
            require grad).
        labels (Tensor): long ``(B, H, W)`` in ``[0, K)`` everywhere (callers replace
            ignored pixels by any valid class, e.g. 0).
        valid (Tensor): bool ``(B, H, W)``, the pixels that count.
        step (int): current attack step ``t`` (1-based), for schedules such as
            SegPGD's. Default: 1.
        total_steps (int): total number of steps ``T``. Default: 1.
        all_valid (bool): the caller knows that ``valid`` is all True; the
            reductions then skip the mask. Default: False.

    Example:
        >>> s = SegLogits(model(x), labels, valid)
        >>> s.ce.shape, s.accuracy.shape  # (B, H, W), (B,)
    """

    def __init__(
        self,
        logits: Tensor,
        labels: Tensor,
        valid: Tensor,
        step: int = 1,
        total_steps: int = 1,
        all_valid: bool = False,
    ) -> None:
        self.logits = logits
        self.labels = labels
        self.valid = valid
        self.step = step
        self.total_steps = total_steps
        self.all_valid = all_valid

    @cached_property
    def log_probs(self) -> Tensor:
        """``log softmax(z)`` over classes, ``(B, K, H, W)``, differentiable.

        Cached, so it is built with gradients whenever the logits have them, even
        on a first access under ``torch.no_grad()``.
        """
        with torch.set_grad_enabled(self.logits.requires_grad):
            return F.log_softmax(self.logits, dim=1)

    @cached_property
    def label_log_prob(self) -> Tensor:
        """``log p_{i, y_i}``, ``(B, H, W)``, differentiable."""
        with torch.set_grad_enabled(self.logits.requires_grad):
            return self.log_probs.gather(1, self.labels.unsqueeze(1)).squeeze(1)

    @cached_property
    def ce(self) -> Tensor:
        """Per-pixel cross-entropy ``CE_i = -log p_{i, y_i}``, ``(B, H, W)``."""
        with torch.set_grad_enabled(self.logits.requires_grad):
            return -self.label_log_prob

    @cached_property
    def pred(self) -> Tensor:
        """``argmax_k z_ik``, long ``(B, H, W)``, no grad."""
        return self.logits.detach().argmax(dim=1)

    @cached_property
    def correct(self) -> Tensor:
        """``correct_i = [argmax_k z_ik == y_i]``, bool ``(B, H, W)`` (detached).

        Computed as ``z_{i,y_i} >= max_k z_ik``: one max over K, several times
        cheaper than an argmax on CPU and the same except at exact ties between
        the label's logit and another class's (where this counts the pixel as
        correct). Attacks evaluate it every iteration; the returned predictions
        are real argmaxes (:func:`predict`).
        """
        z = self.logits.detach()
        label_logit = z.gather(1, self.labels.unsqueeze(1)).squeeze(1)
        return label_logit >= z.amax(dim=1)

    @cached_property
    def num_correct(self) -> Tensor:
        """Correct valid pixels per image, long ``(B,)``."""
        correct = self.correct if self.all_valid else self.correct & self.valid
        return correct.sum(dim=(1, 2))

    @cached_property
    def accuracy(self) -> Tensor:
        """Per-image pixel accuracy, float ``(B,)`` (0 without valid pixels)."""
        n_valid = self.valid.sum(dim=(1, 2)).clamp_min(1)
        return self.num_correct.float() / n_valid.float()

    @cached_property
    def image_ce(self) -> Tensor:
        """Per-image CE (sum over valid pixels / (H*W)), detached, ``(B,)``; the
        quantity APGD's step-size control tracks (section 3.2)."""
        return self.reduce(self.ce.detach())

    def reduce(self, pixel_loss: Tensor) -> Tensor:
        """Per-image objective: sum of ``pixel_loss`` over valid pixels divided by
        ``H*W`` (all pixels, section 2), ``(B,)``."""
        h, w = pixel_loss.shape[-2:]
        if not self.all_valid:
            pixel_loss = torch.where(self.valid, pixel_loss, 0.0)
        return pixel_loss.sum(dim=(1, 2)) / (h * w)
