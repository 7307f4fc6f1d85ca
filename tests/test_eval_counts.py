"""Tests of mmseg_robust.evaluation.counts (per-image counts, metrics)."""

import math

import numpy as np
import pytest
import torch

from mmseg_robust.evaluation.counts import (
    miou_from_counts,
    per_image_counts,
    pixel_accuracy,
    pooled_metrics,
)

NUM_CLASSES = 5
IGNORE = 255


#: the per-class count arrays of per_image_counts
COUNT_KEYS = ('intersect', 'union', 'pred_area', 'label_area')


def _random_maps(seed, shape=(3, 7, 9), num_classes=NUM_CLASSES, ignore_frac=0.2):
    """Random (pred, label) with ~ignore_frac ignored labels.

    pred at ignored pixels is sometimes junk (255) on purpose: it must not be
    counted.
    """
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, num_classes, shape, generator=g)
    pred = torch.randint(0, num_classes, shape, generator=g)
    # Make predictions correct on about half the pixels, so intersections are
    # non-trivial.
    keep = torch.rand(shape, generator=g) < 0.5
    pred = torch.where(keep, label, pred)
    ignored = torch.rand(shape, generator=g) < ignore_frac
    label = label.masked_fill(ignored, IGNORE)
    pred = torch.where(
        ignored & (torch.rand(shape, generator=g) < 0.5),
        torch.full_like(pred, IGNORE),
        pred,
    )
    return pred, label


def _brute_force(pred, label, num_classes, ignore_index, valid=None):
    """Pixel-by-pixel Python oracle for one (H, W) image."""
    inter = [0] * num_classes
    pred_area = [0] * num_classes
    label_area = [0] * num_classes
    correct = n_valid = 0
    for r in range(label.shape[0]):
        for c in range(label.shape[1]):
            y, p = int(label[r, c]), int(pred[r, c])
            if y == ignore_index or (valid is not None and not bool(valid[r, c])):
                continue
            n_valid += 1
            label_area[y] += 1
            pred_area[p] += 1
            if p == y:
                inter[y] += 1
                correct += 1
    union = [pa + la - i for pa, la, i in zip(pred_area, label_area, inter)]
    return dict(
        intersect=inter,
        union=union,
        pred_area=pred_area,
        label_area=label_area,
        correct=correct,
        valid=n_valid,
    )


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_single_image_matches_brute_force(seed):
    pred, label = _random_maps(seed, shape=(11, 13))
    got = per_image_counts(pred, label, NUM_CLASSES, IGNORE)
    want = _brute_force(pred, label, NUM_CLASSES, IGNORE)
    for key in COUNT_KEYS:
        assert got[key].dtype == torch.int64
        assert got[key].tolist() == want[key], key
    assert isinstance(got['correct'], int)
    assert got['correct'] == want['correct']
    assert isinstance(got['valid'], int) and got['valid'] == want['valid']
    # The fixture really ignores some pixels.
    assert 0 < got['valid'] < label.numel()


def test_batch_equals_per_image():
    pred, label = _random_maps(3, shape=(4, 6, 8))
    batch = per_image_counts(pred, label, NUM_CLASSES, IGNORE)
    for key in COUNT_KEYS:
        assert batch[key].shape == (4, NUM_CLASSES)
    assert batch['correct'].shape == (4,) and batch['valid'].shape == (4,)
    for b in range(4):
        single = per_image_counts(pred[b], label[b], NUM_CLASSES, IGNORE)
        for key in COUNT_KEYS:
            assert torch.equal(batch[key][b], single[key]), (b, key)
        assert int(batch['correct'][b]) == single['correct']
        assert int(batch['valid'][b]) == single['valid']


def test_valid_mask_excludes_pixels():
    pred, label = _random_maps(4, shape=(2, 9, 10), ignore_frac=0.1)
    g = torch.Generator().manual_seed(5)
    valid = torch.rand(label.shape, generator=g) < 0.6
    got = per_image_counts(pred, label, NUM_CLASSES, IGNORE, valid=valid)
    # Excluding a pixel by mask is the same as labelling it ignore_index.
    want = per_image_counts(
        pred, label.masked_fill(~valid, IGNORE), NUM_CLASSES, IGNORE
    )
    for key in COUNT_KEYS + ('correct', 'valid'):
        assert torch.equal(got[key], want[key]), key
    for b in range(2):
        oracle = _brute_force(pred[b], label[b], NUM_CLASSES, IGNORE, valid=valid[b])
        assert got['intersect'][b].tolist() == oracle['intersect']
        assert int(got['valid'][b]) == oracle['valid']
    assert (
        got['valid'] < per_image_counts(pred, label, NUM_CLASSES, IGNORE)['valid']
    ).all()


def test_matches_mmseg_intersect_and_union():
    # Only where mmseg (and the mmcv it imports) is installed.
    IoUMetric = pytest.importorskip('mmseg.evaluation.metrics.iou_metric').IoUMetric
    for seed in range(3):
        pred, label = _random_maps(10 + seed, shape=(13, 17))
        ref = IoUMetric.intersect_and_union(pred, label, NUM_CLASSES, IGNORE)
        got = per_image_counts(pred, label, NUM_CLASSES, IGNORE)
        for key, ref_value in zip(COUNT_KEYS, ref):
            np.testing.assert_array_equal(
                got[key].numpy(), ref_value.numpy(), err_msg=key
            )


def test_empty_and_fully_ignored_image():
    label = torch.full((4, 4), IGNORE)
    pred = torch.zeros((4, 4), dtype=torch.long)
    got = per_image_counts(pred, label, NUM_CLASSES, IGNORE)
    assert got['valid'] == 0 and got['correct'] == 0
    assert got['union'].sum() == 0
    assert np.isnan(pixel_accuracy(got['correct'], got['valid']))


def test_out_of_range_classes_raise():
    # NUM_CLASSES itself is not a valid class.
    label = torch.tensor([[0, 1], [2, NUM_CLASSES]])
    pred = torch.zeros_like(label)
    with pytest.raises(ValueError, match='labels outside'):
        per_image_counts(pred, label, NUM_CLASSES, IGNORE)
    label = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match='predictions outside'):
        per_image_counts(torch.full_like(label, -1), label, NUM_CLASSES, IGNORE)
    with pytest.raises(ValueError, match='same shape'):
        per_image_counts(pred[:1], label, NUM_CLASSES, IGNORE)
    with pytest.raises(ValueError, match='integer'):
        per_image_counts(pred.float(), label, NUM_CLASSES, IGNORE)


def test_pixel_accuracy():
    assert pixel_accuracy(3, 4) == 0.75
    # no valid pixels: no accuracy (NaN), left out of every mean over images
    assert np.isnan(pixel_accuracy(0, 0))
    acc = pixel_accuracy(torch.tensor([1, 0, 5]), np.array([2, 0, 5]))
    np.testing.assert_allclose(acc, [0.5, np.nan, 1.0])


def test_miou_from_counts_excludes_zero_union():
    # Class 1 never occurs (union 0): mean over classes 0 and 2 only, not
    # over 3 classes.
    miou = miou_from_counts(np.array([1, 0, 2]), np.array([2, 0, 8]))
    assert miou == pytest.approx((0.5 + 0.25) / 2)
    assert math.isnan(miou_from_counts(np.zeros(3), np.zeros(3)))
    rows = miou_from_counts(np.array([[1, 0], [0, 3]]), np.array([[2, 0], [4, 4]]))
    np.testing.assert_allclose(rows, [0.5, 0.375])


def test_pooled_metrics_hand_example():
    # Image 1: labels [0, 0, 1, ignore], preds [0, 1, 1, 2];
    # image 2: labels [2, 2], preds [2, 0].
    # Class counts: I = [1, 1, 1], label area = [2, 1, 2],
    # pred area = [2, 2, 1].
    c1 = per_image_counts(
        torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 0, 1, IGNORE]]), 3, IGNORE
    )
    c2 = per_image_counts(torch.tensor([[2, 0]]), torch.tensor([[2, 2]]), 3, IGNORE)
    m = pooled_metrics([c1, c2])
    iou = np.array([1 / 3, 1 / 2, 1 / 2])  # I / (pred + label - I)
    np.testing.assert_allclose(m['IoU'], iou)
    assert m['mIoU'] == pytest.approx(iou.mean())
    # Pooled, not the mean of 2/3 and 1/2.
    assert m['aAcc'] == pytest.approx(3 / 5)
    np.testing.assert_allclose(m['Acc'], [1 / 2, 1, 1 / 2])
    assert m['mAcc'] == pytest.approx(2 / 3)
    assert m['num_images'] == 2


def test_pooled_metrics_batches_and_absent_class():
    pred, label = _random_maps(7, shape=(3, 8, 8), num_classes=4)
    pred = pred.clamp(max=3)
    # 6 classes, of which 4 and 5 never occur.
    batch = per_image_counts(pred, label, 6, IGNORE)
    singles = [per_image_counts(pred[b], label[b], 6, IGNORE) for b in range(3)]
    m_batch, m_single = pooled_metrics([batch]), pooled_metrics(singles)
    assert m_batch['mIoU'] == m_single['mIoU'] and m_batch['num_images'] == 3
    assert np.isnan(m_batch['IoU'][4:]).all()
    assert m_batch['mIoU'] == pytest.approx(np.nanmean(m_batch['IoU']))
    total_correct = int(batch['correct'].sum())
    total_valid = int(batch['valid'].sum())
    assert m_batch['aAcc'] == pytest.approx(total_correct / total_valid)
    with pytest.raises(ValueError):
        pooled_metrics([])
