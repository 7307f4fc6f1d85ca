"""Data of the SAT/DDC-AT configs (docs/algorithms.md sections 5.2, 5.3): the
semseg-style reference's augmentation (scale, rotation, Gaussian blur
``cv2.GaussianBlur(img, (5, 5), 0)`` with p=0.5, flip, crop) and PASCAL VOC train_aug =
``train.txt`` + ``aug.txt`` (mmseg's voc_aug.py lists)."""

import glob
import os.path as osp

import cv2
import numpy as np
import pytest
from mmengine.config import Config

import mmseg_robust  # noqa: F401  (registers RandomGaussianBlur)
from mmseg_robust.registry import TRANSFORMS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DATASETS_DIR = osp.join(REPO, 'configs', '_base_', 'datasets')
VOC = osp.join(DATASETS_DIR, 'voc12aug_473x473.py')
CITYSCAPES = osp.join(DATASETS_DIR, 'cityscapes_449x449.py')
TOP_LEVEL = sorted(
    glob.glob(osp.join(REPO, 'configs', 'sat', '*.py'))
    + glob.glob(osp.join(REPO, 'configs', 'ddcat', '*.py'))
)
BLUR = dict(type='RandomGaussianBlur', prob=0.5, kernel_size=5, sigma=0)


def _image(dtype=np.uint8, shape=(23, 31, 3), seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, shape).astype(dtype)
    return np.ascontiguousarray(img)


# ----------------------------------------------------------------------------
# RandomGaussianBlur, OpenCV form
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
def test_opencv_blur_equals_cv2_and_leaves_labels(dtype):
    blur = TRANSFORMS.build(dict(BLUR, prob=1.0))
    img = _image(dtype)
    label = np.random.default_rng(1).integers(0, 21, img.shape[:2]).astype(np.uint8)
    results = blur(
        dict(img=img.copy(), gt_seg_map=label.copy(), seg_fields=['gt_seg_map'])
    )
    expected = cv2.GaussianBlur(img, (5, 5), 0)
    assert results['img'].dtype == img.dtype
    np.testing.assert_array_equal(results['img'], expected)
    assert not np.array_equal(results['img'], img)
    np.testing.assert_array_equal(results['gt_seg_map'], label)
    if dtype == np.float32:
        # sigma 0 is OpenCV's "from the kernel size": for 5x5 the binomial
        # [1, 4, 6, 4, 1] / 16 in each direction (reflect-101 borders).
        k = np.array([1, 4, 6, 4, 1], np.float32) / 16
        np.testing.assert_allclose(
            results['img'],
            cv2.sepFilter2D(img, -1, k, k, borderType=cv2.BORDER_REFLECT_101),
            rtol=1e-5,
            atol=1e-3,
        )


@pytest.mark.parametrize('prob', [0.5, 0.2])
def test_opencv_blur_fires_with_its_probability(prob):
    blur = TRANSFORMS.build(dict(BLUR, prob=prob))
    img = _image(shape=(6, 7, 3))
    n = 2000
    np.random.seed(0)
    fired = [
        not np.array_equal(blur(dict(img=img.copy()))['img'], img) for _ in range(n)
    ]
    # One draw per call, blurring when it is below prob (the reference's
    # `random.random() < 0.5`).
    np.random.seed(0)
    np.testing.assert_array_equal(fired, np.random.rand(n) < prob)
    assert abs(np.mean(fired) - prob) < 0.04


def test_blur_options():
    # The PIL form stays the default (PIR-AT pipelines).
    default = TRANSFORMS.build(dict(type='RandomGaussianBlur'))
    assert (default.prob, default.max_radius, default.kernel_size) == (0.5, 1.0, None)
    assert 'max_radius=1.0' in repr(default)
    assert 'kernel_size=5' in repr(TRANSFORMS.build(BLUR))
    for bad in (
        dict(kernel_size=4),
        dict(kernel_size=0),
        dict(kernel_size=2.5),
        dict(kernel_size=5, max_radius=1.0),
        dict(sigma=1.0),
        dict(kernel_size=5, sigma=-1),
        dict(prob=1.5),
    ):
        with pytest.raises(ValueError):
            TRANSFORMS.build(dict(type='RandomGaussianBlur', **bad))


# ----------------------------------------------------------------------------
# The two SAT/DDC-AT dataset configs
# ----------------------------------------------------------------------------
def _train_datasets(cfg):
    dataset = cfg.train_dataloader.dataset
    return dataset.datasets if dataset.type == 'ConcatDataset' else [dataset]


@pytest.mark.parametrize(
    'path', [VOC, CITYSCAPES] + TOP_LEVEL, ids=lambda p: osp.relpath(p, REPO)
)
def test_pipeline_blurs_after_rotation_before_flip(path):
    for dataset in _train_datasets(Config.fromfile(path)):
        pipeline = dataset.pipeline
        types = [t['type'] for t in pipeline]
        assert types == [
            'LoadImageFromFile',
            'LoadAnnotations',
            'RandomResize',
            'RandomRotate',
            'RandomGaussianBlur',
            'RandomFlip',
            'RandomCrop',
            'Pad',
            'PackSegInputs',
        ]
        assert pipeline[types.index('RandomGaussianBlur')] == BLUR


@pytest.mark.parametrize(
    'path',
    [VOC] + [p for p in TOP_LEVEL if 'voc' in p],
    ids=lambda p: osp.relpath(p, REPO),
)
def test_voc_trains_on_train_plus_aug(path):
    # mmseg's voc_aug.py: aug.txt = SBD minus VOC train and val (9118 ids), so
    # train_aug (10582) = train.txt (SegmentationClass) + aug.txt
    # (SegmentationClassAug).
    cfg = Config.fromfile(path)
    dataset = cfg.train_dataloader.dataset
    assert dataset.type == 'ConcatDataset'
    train, aug = dataset.datasets
    assert (train.ann_file, train.data_prefix) == (
        'ImageSets/Segmentation/train.txt',
        dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
    )
    assert (aug.ann_file, aug.data_prefix) == (
        'ImageSets/Segmentation/aug.txt',
        dict(img_path='JPEGImages', seg_map_path='SegmentationClassAug'),
    )
    for part in (train, aug):
        assert part.type == 'PascalVOCDataset'
        assert part.data_root == 'data/VOCdevkit/VOC2012'
    assert train.pipeline == aug.pipeline
    val = cfg.val_dataloader.dataset
    assert val.ann_file == 'ImageSets/Segmentation/val.txt'
