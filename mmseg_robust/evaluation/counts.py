"""Per-image confusion counts and the metrics pooled from them.

SEA's worst-case aggregation (docs/algorithms.md section 4) needs, per image and
attack, only the per-class intersection and union counts and the pixel
accuracy, never the prediction maps. This module computes those counts with
``torch.bincount`` (one pass over the pixels, no Python loop over pixels or
classes) and pools them into mmseg's dataset metrics.

Conventions follow mmseg's ``IoUMetric``
(``mmseg/evaluation/metrics/iou_metric.py``):

* a pixel is valid when its label is not ``ignore_index`` (and, here, when an
  optional ``valid`` mask is true, e.g. to exclude padding);
* ``intersect[c]`` = #valid pixels with ``pred == label == c``;
  ``pred_area[c]`` = #valid pixels predicted ``c``; ``label_area[c]`` = #valid
  pixels labelled ``c``; ``union = pred_area + label_area - intersect``;
* pooled metrics sum the counts over images first: IoU_c = I_c / U_c, mIoU =
  mean over classes with U_c > 0, Acc_c = I_c / label_area_c, mAcc = mean over
  classes with label_area_c > 0, aAcc = sum_c I_c / sum_c label_area_c.

Unlike mmseg, whose ``torch.histc`` silently drops values outside
``[0, num_classes)``, labels (other than ``ignore_index``) and predictions
outside that range raise a ``ValueError``: they mean a wrong ``num_classes``
or label mapping, and dropping them would bias every metric. All pooled
values are fractions in [0, 1], not mmseg's rounded percentages.
"""

from typing import Dict, Iterable, List, Optional, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def _to_numpy(x) -> np.ndarray:
    """Return ``x`` as a numpy array (torch tensors are moved to CPU first)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def per_image_counts(
    pred: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    valid: Optional[torch.Tensor] = None,
) -> Dict:
    """Per-image intersection/union/area counts, as in mmseg's ``IoUMetric``.

    The counts are what SEA's worst-case mIoU and aACC are computed from
    (docs/algorithms.md section 4); per image they equal
    ``IoUMetric.intersect_and_union`` (as int64, not float).

    Args:
        pred (torch.Tensor): Predicted class indices, integer tensor of shape
            (H, W) for one image or (B, H, W) for a batch, values in
            ``[0, num_classes)`` at valid pixels.
        label (torch.Tensor): Ground-truth class indices, same shape as
            ``pred``, values in ``[0, num_classes)`` or ``ignore_index``.
        num_classes (int): Number of classes K.
        ignore_index (int): Label value of pixels excluded from evaluation.
            Defaults to 255.
        valid (torch.Tensor, optional): Boolean mask of the shape of ``label``;
            False pixels (e.g. padding) are excluded in addition to
            ``ignore_index``. Defaults to None.

    Returns:
        dict: For a single (H, W) image: ``intersect``, ``union``,
        ``pred_area``, ``label_area`` as int64 CPU tensors of shape (K,), and
        ``correct`` (#valid pixels predicted correctly) and ``valid`` (#valid
        pixels) as Python ints. For a (B, H, W) batch the four count tensors
        have shape (B, K) and ``correct`` / ``valid`` are int64 CPU tensors of
        shape (B,), row ``b`` being image ``b``.

    Raises:
        ValueError: On mismatched shapes, non-integer inputs, or class
            indices outside ``[0, num_classes)`` at valid pixels.

    Example:
        >>> c = per_image_counts(pred, label, num_classes=21)  # (H, W) tensors
        >>> pixel_accuracy(c['correct'], c['valid'])
    """
    if pred.shape != label.shape:
        raise ValueError(
            f'pred and label must have the same shape, got '
            f'{tuple(pred.shape)} and {tuple(label.shape)}'
        )
    if pred.dim() not in (2, 3):
        raise ValueError(
            f'pred and label must be (H, W) or (B, H, W), got shape {tuple(pred.shape)}'
        )
    if pred.is_floating_point() or label.is_floating_point():
        raise ValueError(
            'pred and label must be integer class-index tensors (e.g. '
            'logits.argmax(1)), got floating point'
        )
    if num_classes < 1:
        raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    if valid is not None and valid.shape != label.shape:
        raise ValueError(
            f'valid mask must have the shape of label {tuple(label.shape)}, '
            f'got {tuple(valid.shape)}'
        )
    single = pred.dim() == 2
    if single:
        pred, label = pred[None], label[None]
        valid = None if valid is None else valid[None]
    num_images = pred.shape[0]
    label = label.to(pred.device)

    mask = label != ignore_index
    if valid is not None:
        mask = mask & valid.to(device=mask.device, dtype=torch.bool)

    # Image index of every pixel, so one bincount over (image, class) pairs
    # gives all per-image histograms at once: bin = image * K + class.
    image_idx = (
        torch.arange(num_images, device=pred.device).view(-1, 1, 1).expand_as(pred)
    )
    image_idx = image_idx[mask].long()
    pred_v = pred[mask].long()
    label_v = label[mask].long()
    if pred_v.numel() > 0:
        # One reduction (one device sync) for the range check of both maps.
        bounds = torch.stack([pred_v.min(), pred_v.max(), label_v.min(), label_v.max()])
        p_min, p_max, l_min, l_max = bounds.tolist()
        if l_min < 0 or l_max >= num_classes:
            raise ValueError(
                f'labels outside [0, {num_classes}) at non-ignored pixels '
                f'(found {l_min}..{l_max}, ignore_index={ignore_index}): '
                f'check num_classes, ignore_index and reduce_zero_label'
            )
        if p_min < 0 or p_max >= num_classes:
            raise ValueError(
                f'predictions outside [0, {num_classes}) at valid pixels '
                f'(found {p_min}..{p_max}): check num_classes'
            )

    n_bins = num_images * num_classes
    hit = pred_v == label_v
    pred_area = torch.bincount(image_idx * num_classes + pred_v, minlength=n_bins)
    label_bins = image_idx * num_classes + label_v
    label_area = torch.bincount(label_bins, minlength=n_bins)
    intersect = torch.bincount(label_bins[hit], minlength=n_bins)

    shape = (num_images, num_classes)
    intersect = intersect.view(shape).cpu()
    pred_area = pred_area.view(shape).cpu()
    label_area = label_area.view(shape).cpu()
    union = pred_area + label_area - intersect
    # Every valid pixel is counted once in label_area and, when correct, once
    # in intersect (all classes are in range after the check above).
    correct = intersect.sum(1)
    n_valid = label_area.sum(1)
    if single:
        return dict(
            intersect=intersect[0],
            union=union[0],
            pred_area=pred_area[0],
            label_area=label_area[0],
            correct=int(correct[0]),
            valid=int(n_valid[0]),
        )
    return dict(
        intersect=intersect,
        union=union,
        pred_area=pred_area,
        label_area=label_area,
        correct=correct,
        valid=n_valid,
    )


def pixel_accuracy(
    correct: Union[int, ArrayLike], valid: Union[int, ArrayLike]
) -> Union[float, np.ndarray]:
    """Per-image pixel accuracy ``correct / valid`` (NaN without valid pixels).

    This is the per-image quantity whose minimum over attacks SEA's worst-case
    aACC averages (docs/algorithms.md section 4), and the one per-image
    accuracy of the evaluation (the records, the worst-case example, the
    self-checks).

    Args:
        correct (int | array): #correctly predicted valid pixels, scalar or any
            shape.
        valid (int | array): #valid pixels, same shape as ``correct``.

    Returns:
        float | np.ndarray: A float for scalar inputs, else a float64 array
        of the input shape. An image without valid pixels (a fully ignored
        crop) has no accuracy: NaN. Every mean over images leaves such images
        out (SEA's aACC, ``aAcc_img``), and so do the above-clean counts.
    """
    correct = _to_numpy(correct).astype(np.float64)
    valid = _to_numpy(valid).astype(np.float64)
    acc = np.divide(
        correct,
        valid,
        out=np.full(np.broadcast(correct, valid).shape, np.nan),
        where=valid > 0,
    )
    return float(acc) if acc.ndim == 0 else acc


def miou_from_counts(
    intersect_sum: ArrayLike, union_sum: ArrayLike
) -> Union[float, np.ndarray]:
    """Mean IoU over the classes with non-zero union (docs/algorithms.md section 4).

    mIoU = mean_{c: U_c > 0} I_c / U_c, with I and U summed over the images
    first. Classes absent from both the labels and the predictions (U_c = 0)
    are excluded, as mmseg's ``nanmean`` over ``0 / 0`` does.

    Args:
        intersect_sum (array): Summed intersections, shape (K,) or (..., K).
        union_sum (array): Summed unions, same shape.

    Returns:
        float | np.ndarray: A float for (K,) inputs, else an array of the
        leading shape (one mIoU per row, used to score several candidate
        assignments at once). nan where no class has a non-zero union.
    """
    inter = _to_numpy(intersect_sum).astype(np.float64, copy=False)
    union = _to_numpy(union_sum).astype(np.float64, copy=False)
    if inter.shape != union.shape:
        raise ValueError(
            f'intersect_sum and union_sum must have the same shape, got '
            f'{inter.shape} and {union.shape}'
        )
    present = union > 0
    iou = np.divide(inter, union, out=np.zeros(inter.shape), where=present)
    n_present = present.sum(-1)
    with np.errstate(invalid='ignore', divide='ignore'):
        miou = np.where(n_present > 0, iou.sum(-1) / n_present, np.nan)
    return float(miou) if miou.ndim == 0 else miou


def pooled_metrics(counts_list: Iterable[Dict]) -> Dict:
    """Dataset metrics from per-image counts, pooled as mmseg's IoUMetric does.

    Args:
        counts_list (Iterable[dict]): Outputs of :func:`per_image_counts`
            (single images or batches, mixed freely); only ``intersect``,
            ``union`` and ``label_area`` are read.

    Returns:
        dict: ``mIoU`` (float, mean IoU over classes with union > 0),
        ``aAcc`` (float, pooled pixel accuracy = total intersect / total label
        area), ``mAcc`` (float, mean per-class accuracy over the classes
        present in the labels), ``IoU`` and ``Acc`` (float64 arrays of shape
        (K,), nan for excluded classes), and ``num_images`` (int). All
        fractions in [0, 1]; nan when undefined (e.g. no valid pixels).

    Raises:
        ValueError: If ``counts_list`` is empty or the class counts K differ.
    """
    totals = None
    num_images = 0
    for counts in counts_list:
        arrays = [
            _to_numpy(counts[k]).astype(np.int64)
            for k in ('intersect', 'union', 'label_area')
        ]
        num_classes = arrays[0].shape[-1]
        rows = [a.reshape(-1, num_classes) for a in arrays]
        if totals is None:
            totals = [np.zeros(num_classes, dtype=np.int64) for _ in rows]
        elif totals[0].shape[0] != num_classes:
            raise ValueError(
                f'counts with different numbers of classes: '
                f'{totals[0].shape[0]} and {num_classes}'
            )
        for total, r in zip(totals, rows):
            total += r.sum(0)
        num_images += rows[0].shape[0]
    if totals is None:
        raise ValueError('pooled_metrics needs at least one per_image_counts result')
    inter, union, label_area = (t.astype(np.float64) for t in totals)

    with np.errstate(invalid='ignore', divide='ignore'):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(label_area > 0, inter / label_area, np.nan)
        a_acc = inter.sum() / label_area.sum()  # nan without valid pixels
    m_acc = float(np.nanmean(acc)) if np.any(label_area > 0) else float('nan')
    return dict(
        mIoU=miou_from_counts(inter, union),
        aAcc=float(a_acc),
        mAcc=m_acc,
        IoU=iou,
        Acc=acc,
        num_images=num_images,
    )


#: Count arrays stored per image and prediction (pred_area is derivable).
RECORD_COUNT_KEYS = ('intersect', 'union', 'label_area')


def counts_of_batch(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int
) -> List[dict]:
    """Per-image counts of a batch as JSON-friendly dicts (lists of ints)."""
    counts = per_image_counts(pred, label, num_classes, ignore_index)
    out = []
    for i in range(pred.shape[0]):
        rec = {k: counts[k][i].tolist() for k in RECORD_COUNT_KEYS}
        rec['correct'] = int(counts['correct'][i])
        rec['valid'] = int(counts['valid'][i])
        out.append(rec)
    return out


def image_record(
    key: str, num_classes: int, clean: dict, attacks: Dict[str, Dict[str, dict]]
) -> dict:
    """One image's record: ``{'key', 'num_classes', 'clean', 'attacks'}`` with
    ``attacks[eps][attack_name]`` = counts (eps as a string, e.g. ``'8'``)."""
    return dict(key=key, num_classes=num_classes, clean=clean, attacks=attacks)


def eps_key(eps: float) -> str:
    """The string under which the JSON records (cache, results file) store an
    eps in /255 (``8.0`` -> ``'8'``)."""
    return f'{float(eps):g}'
