"""The embedded synthetic dataset: deterministic, mmseg layout, loads through mmseg."""

import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest

from mmseg_robust.datasets import CLASSES, generate_synthetic_dataset, render_sample


def test_render_is_deterministic_and_labels_in_range():
    img1, lab1 = render_sample(123)
    img2, lab2 = render_sample(123)
    img3, _ = render_sample(124)
    assert img1.shape == (64, 64, 3) and img1.dtype == np.uint8
    assert lab1.shape == (64, 64) and lab1.dtype == np.uint8
    np.testing.assert_array_equal(img1, img2)
    np.testing.assert_array_equal(lab1, lab2)
    assert not np.array_equal(img1, img3)
    assert lab1.max() < len(CLASSES)


def test_every_class_occurs_with_sensible_frequency():
    labels = np.stack([render_sample(i)[1] for i in range(60)])
    freq = np.bincount(labels.ravel(), minlength=len(CLASSES)) / labels.size
    assert (freq > 0.02).all(), freq  # no class is missing or negligible
    assert 0.5 < freq[0] < 0.95, freq  # background dominates but not entirely


def test_layout_meta_and_reuse(tmp_path):
    root = str(tmp_path / 'syn')
    generate_synthetic_dataset(root, splits=dict(train=3, val=2), size=32)
    for split, n in (('train', 3), ('val', 2)):
        assert sorted(os.listdir(osp.join(root, 'img_dir', split))) == [
            f'{i:05d}.png' for i in range(n)
        ]
        assert len(os.listdir(osp.join(root, 'ann_dir', split))) == n
    meta = json.load(open(osp.join(root, 'meta.json')))
    assert meta['splits'] == dict(train=3, val=2) and meta['size'] == 32
    mtime = os.path.getmtime(osp.join(root, 'img_dir', 'train', '00000.png'))
    generate_synthetic_dataset(root, splits=dict(train=3, val=2), size=32)
    assert (
        os.path.getmtime(osp.join(root, 'img_dir', 'train', '00000.png')) == mtime
    )  # reused, not redone
    with pytest.raises(RuntimeError, match='Delete the folder'):
        generate_synthetic_dataset(root, splits=dict(train=4, val=2), size=32)


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / 'x.txt').write_text('not a dataset')
    with pytest.raises(RuntimeError, match='not a synthetic dataset'):
        generate_synthetic_dataset(str(tmp_path), splits=dict(train=1, val=1))


def test_concurrent_generation_is_safe(tmp_path):
    # Several processes (like the ranks of a distributed job) generate at once.
    root = str(tmp_path / 'race')
    code = (
        'from mmseg_robust.datasets import generate_synthetic_dataset; '
        f'generate_synthetic_dataset({root!r}, splits=dict(train=6, val=2), '
        'size=32)'
    )
    procs = [subprocess.Popen([sys.executable, '-c', code]) for _ in range(3)]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    assert len(os.listdir(osp.join(root, 'img_dir', 'train'))) == 6
    # no temporary folders left behind
    assert [d for d in os.listdir(tmp_path) if d.startswith('.synthetic')] == []


def test_loads_through_mmseg_pipeline(synthetic_root):
    from mmengine.registry import init_default_scope

    from mmseg_robust.registry import DATASETS

    init_default_scope('mmseg')
    ds = DATASETS.build(
        dict(
            type='SyntheticShapesDataset',
            data_root=synthetic_root,
            generator_cfg=dict(splits=dict(train=48, val=16)),
            data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='LoadAnnotations'),
                dict(type='PackSegInputs'),
            ],
        )
    )
    assert len(ds) == 16
    assert ds.metainfo['classes'] == CLASSES
    sample = ds[0]
    img = sample['inputs']
    gt = sample['data_samples'].gt_sem_seg.data
    assert tuple(img.shape) == (3, 64, 64)
    assert tuple(gt.shape) == (1, 64, 64)
    # The PNG round trip is lossless: the packed label equals the rendered one.
    _, label = render_sample(0 * 10_000_000 + 1_000_000 + 0, 64)
    np.testing.assert_array_equal(gt[0].numpy(), label)
