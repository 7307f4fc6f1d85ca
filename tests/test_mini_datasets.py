"""Miniature real-format datasets: layout, determinism, mmseg's real dataset classes.

The fixtures ``mini_voc``, ``mini_ade20k`` and ``mini_cityscapes`` (conftest.py)
write tests/mini_datasets.py's datasets in the layouts of the official archives
and mmseg's converters; these tests read them through mmseg's (and our) dataset
classes and the configs' pipelines.
"""

import os
import os.path as osp
import time

import numpy as np
import pytest
from PIL import Image

import mmseg_robust  # noqa: F401  (registers our datasets and transforms)

LOAD = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations')]
CONFIGS = osp.join(
    osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs', '_base_', 'datasets'
)


@pytest.fixture(autouse=True)
def _mmseg_scope():
    from mmengine.registry import init_default_scope

    init_default_scope('mmseg')


def _files(root):
    """Relative path -> bytes of every file under ``root``."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = osp.join(folder, name)
            with open(path, 'rb') as f:
                out[osp.relpath(path, root)] = f.read()
    return out


def _read_list(path):
    with open(path) as f:
        text = f.read()
    assert text.endswith('\n') and '\n\n' not in text, repr(text[-40:])
    return text.splitlines()


def _load(ds, index):
    """(image (h, w, 3), label (h, w)) of ``ds[index]`` loaded by the pipeline."""
    results = ds[index]
    assert results['img'].dtype == np.uint8
    assert results['gt_seg_map'].dtype == np.uint8
    assert results['gt_seg_map'].shape == results['img'].shape[:2]
    return results['img'], results['gt_seg_map']


def _name(path, suffix):
    assert path.endswith(suffix), path
    return osp.basename(path)[: -len(suffix)]


def test_generation_is_fast_and_deterministic(
    tmp_path, mini_datasets, mini_voc, mini_ade20k, mini_cityscapes
):
    start = time.perf_counter()
    roots = [
        mini_datasets.make_mini_voc(str(tmp_path)),
        mini_datasets.make_mini_ade20k(str(tmp_path)),
        mini_datasets.make_mini_cityscapes(str(tmp_path)),
    ]
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f'generation took {elapsed:.1f} s'
    # Byte-identical to the session fixtures' independent generation.
    for root, fixture_root in zip(roots, (mini_voc, mini_ade20k, mini_cityscapes)):
        files, expected = _files(root), _files(fixture_root)
        assert sorted(files) == sorted(expected)
        assert files == expected
    total = sum(len(b) for root in roots for b in _files(root).values())
    assert total < 4 * 2**20, f'{total / 2**20:.1f} MiB'


def test_voc_layout_matches_voc_aug_converter(mini_voc, mini_datasets):
    ids, counts = mini_datasets.VOC_IDS, mini_datasets.VOC_COUNTS
    sets = osp.join(mini_voc, 'ImageSets', 'Segmentation')
    lists = {
        n: _read_list(osp.join(sets, f'{n}.txt'))
        for n in ('train', 'val', 'aug', 'trainaug')
    }
    assert sorted(os.listdir(sets)) == [
        'aug.txt',
        'train.txt',
        'trainaug.txt',
        'val.txt',
    ]
    assert {n: len(v) for n, v in lists.items()} == dict(
        train=counts['train'],
        val=counts['val'],
        aug=counts['aug'],
        trainaug=counts['trainaug'],
    )
    train, val, sbd = lists['train'], lists['val'], ids['sbd']
    # What tools/dataset_converters/voc_aug.py computes.
    assert set(lists['trainaug']) == set(train + sbd) - set(val)
    assert set(lists['aug']) == set(sbd) - set(train + val)
    assert len(set(lists['trainaug'])) == len(lists['trainaug'])
    assert len(lists['trainaug']) == len(train) + len(lists['aug'])
    # SBD overlaps VOC train and val; some VOC train ids are not in SBD.
    assert set(sbd) & set(train) and set(sbd) & set(val)
    assert set(train) - set(sbd)
    # Files: every listed id has a JPEG; VOC labels for VOC ids, SBD for SBD.
    all_ids = set(train + val + sbd)
    assert sorted(os.listdir(osp.join(mini_voc, 'JPEGImages'))) == sorted(
        i + '.jpg' for i in all_ids
    )
    assert sorted(os.listdir(osp.join(mini_voc, 'SegmentationClass'))) == sorted(
        i + '.png' for i in train + val
    )
    assert sorted(os.listdir(osp.join(mini_voc, 'SegmentationClassAug'))) == sorted(
        i + '.png' for i in sbd
    )
    palette = mini_datasets.voc_palette()
    assert palette[:6] == [0, 0, 0, 128, 0, 0] and palette[-3:] == [224, 224, 192]
    for img_id in sorted(all_ids):
        with Image.open(osp.join(mini_voc, 'JPEGImages', img_id + '.jpg')) as im:
            assert (im.format, im.mode) == ('JPEG', 'RGB')
            assert im.size == mini_datasets.VOC_IMAGES[img_id]
        if img_id in train + val:
            with Image.open(
                osp.join(mini_voc, 'SegmentationClass', img_id + '.png')
            ) as im:
                assert (im.format, im.mode) == ('PNG', 'P')
                assert im.getpalette()[:768] == palette
                assert im.size == mini_datasets.VOC_IMAGES[img_id]
        if img_id in sbd:
            with Image.open(
                osp.join(mini_voc, 'SegmentationClassAug', img_id + '.png')
            ) as im:
                assert (im.format, im.mode) == ('PNG', 'L')
                assert im.size == mini_datasets.VOC_IMAGES[img_id]


def test_voc_through_mmseg_datasets(mini_voc, mini_datasets):
    from mmseg.datasets import PascalVOCDataset

    from mmseg_robust.datasets import PascalVOCVoidAsBackgroundDataset

    def voc(ann, seg, cls=PascalVOCDataset):
        return cls(
            data_root=mini_voc,
            data_prefix=dict(img_path='JPEGImages', seg_map_path=seg),
            ann_file=f'ImageSets/Segmentation/{ann}.txt',
            pipeline=LOAD,
        )

    train = voc('train', 'SegmentationClass')
    aug = voc('aug', 'SegmentationClassAug')
    val = voc('val', 'SegmentationClass')
    counts = mini_datasets.VOC_COUNTS
    assert (len(train), len(aug), len(val)) == (
        counts['train'],
        counts['aug'],
        counts['val'],
    )
    # train + aug is the 'trainaug' list, nothing twice, every file present.
    listed = [
        _name(train.get_data_info(i)['img_path'], '.jpg') for i in range(len(train))
    ] + [_name(aug.get_data_info(i)['img_path'], '.jpg') for i in range(len(aug))]
    assert len(listed) == len(set(listed)) == counts['trainaug']
    assert sorted(listed) == mini_datasets.VOC_IDS['trainaug']
    for ds in (train, aug, val):
        for i in range(len(ds)):
            info = ds.get_data_info(i)
            assert osp.isfile(info['img_path']) and osp.isfile(info['seg_map_path'])

    sizes = set()
    for ds, void in ((train, True), (val, True), (aug, False)):
        for i in range(len(ds)):
            img, label = _load(ds, i)
            img_id = _name(ds.get_data_info(i)['img_path'], '.jpg')
            w, h = mini_datasets.VOC_IMAGES[img_id]
            assert img.shape == (h, w, 3)
            sizes.add((w, h))
            values = set(np.unique(label).tolist())
            assert values <= set(range(21)) | {255}, values
            assert len(values - {255}) >= 2, values  # background + objects
            assert (255 in values) == void, (img_id, values)
    # Varied sizes, some below the 473 crop, some (long side 500) above.
    assert len(sizes) >= 4
    assert any(max(s) < 473 for s in sizes) and any(max(s) > 473 for s in sizes)

    # Void as background: 255 becomes 0, every other label is kept.
    train_bg = voc('train', 'SegmentationClass', PascalVOCVoidAsBackgroundDataset)
    _, raw = _load(train, 0)
    _, mapped = _load(train_bg, 0)
    np.testing.assert_array_equal(mapped, np.where(raw == 255, 0, raw))


def test_ade20k_through_mmseg_datasets(mini_ade20k, mini_datasets):
    from mmseg.datasets import ADE20KDataset

    from mmseg_robust.datasets import ADE20K151Dataset

    counts, images = mini_datasets.ADE20K_COUNTS, mini_datasets.ADE20K_IMAGES
    for split in ('training', 'validation'):
        kwargs = dict(
            data_root=mini_ade20k,
            data_prefix=dict(
                img_path=f'images/{split}', seg_map_path=f'annotations/{split}'
            ),
            pipeline=LOAD,
        )
        ade150, ade151 = ADE20KDataset(**kwargs), ADE20K151Dataset(**kwargs)
        assert len(ade150) == len(ade151) == counts[split]
        names = [
            _name(ade151.get_data_info(i)['img_path'], '.jpg')
            for i in range(len(ade151))
        ]
        assert names == sorted(images[split])
        for i, name in enumerate(names):
            img, raw = _load(ade151, i)
            _, reduced = _load(ade150, i)
            w, h = images[split][name]
            assert img.shape == (h, w, 3)
            values = set(np.unique(raw).tolist())
            assert values <= set(range(151)) and 0 in values, values
            assert len(values) >= 4, values
            # mmseg's 150-class protocol: 0 ("other") ignored, the rest shifted.
            expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
            np.testing.assert_array_equal(reduced, expected)


def test_cityscapes_through_mmseg_datasets(mini_cityscapes, mini_datasets):
    from mmseg.datasets import CityscapesDataset

    counts, images = mini_datasets.CITYSCAPES_COUNTS, mini_datasets.CITYSCAPES_IMAGES
    for split in ('train', 'val'):
        # The list tools/dataset_converters/cityscapes.py writes.
        assert sorted(_read_list(osp.join(mini_cityscapes, f'{split}.txt'))) == sorted(
            images[split]
        )
        ds = CityscapesDataset(
            data_root=mini_cityscapes,
            data_prefix=dict(
                img_path=f'leftImg8bit/{split}', seg_map_path=f'gtFine/{split}'
            ),
            pipeline=LOAD,
        )
        assert len(ds) == counts[split]
        for i in range(len(ds)):
            info = ds.get_data_info(i)
            rel = osp.relpath(
                info['img_path'], osp.join(mini_cityscapes, 'leftImg8bit', split)
            )
            name = rel[: -len('_leftImg8bit.png')]
            assert info['seg_map_path'] == osp.join(
                mini_cityscapes, 'gtFine', split, name + '_gtFine_labelTrainIds.png'
            )
            img, label = _load(ds, i)
            w, h = images[split][name]
            assert img.shape == (h, w, 3) and w == 2 * h
            values = set(np.unique(label).tolist())
            assert values <= set(range(19)) | {255} and 255 in values, values
            assert len(values - {255}) >= 4, values
            with Image.open(info['img_path']) as im:
                assert (im.format, im.mode) == ('PNG', 'RGB')


def _config_datasets(name, data_root):
    """train and val datasets of a dataset config, pointed at ``data_root``."""
    from mmengine.config import Config

    from mmseg_robust.registry import DATASETS

    cfg = Config.fromfile(osp.join(CONFIGS, name))
    out = []
    for loader in (cfg.train_dataloader, cfg.val_dataloader):
        ds_cfg = loader.dataset
        for sub in ds_cfg.get('datasets', [ds_cfg]):
            sub.data_root = data_root
        out.append(DATASETS.build(ds_cfg))
    return out


@pytest.mark.parametrize(
    'config, fixture, lengths, train_max, val_shape',
    [
        (
            'voc12aug_void-as-background_473x473.py',
            'mini_voc',
            (11, 4),
            (473, 473),
            (473, 473),
        ),
        ('ade20k151_512x512.py', 'mini_ade20k', (5, 3), (512, 512), (512, 512)),
        ('cityscapes_449x449.py', 'mini_cityscapes', (4, 3), (449, 449), None),
    ],
)
def test_config_pipelines(request, config, fixture, lengths, train_max, val_shape):
    train, val = _config_datasets(config, request.getfixturevalue(fixture))
    assert (len(train), len(val)) == lengths
    for ds, limit in ((train, train_max), (val, val_shape)):
        for i in (0, len(ds) - 1):
            sample = ds[i]
            img = sample['inputs']
            gt = sample['data_samples'].gt_sem_seg.data
            assert img.shape[0] == 3 and gt.shape[0] == 1
            if ds is train:
                assert img.shape[1] <= limit[0] and img.shape[2] <= limit[1]
                assert gt.shape[1:] == img.shape[1:]
            elif val_shape:
                assert tuple(img.shape[1:]) == val_shape
                assert gt.shape[1:] == img.shape[1:]
            else:
                # Cityscapes' test pipeline resizes the image to 1024x512 and loads
                # the labels afterwards, at full resolution (mmseg's convention).
                assert tuple(img.shape[1:]) == (512, 1024)
                path = ds.get_data_info(i)['seg_map_path']
                with Image.open(path) as im:
                    assert tuple(gt.shape[1:]) == im.size[::-1]


def test_ddcat_voc_config_trains_on_trainaug(mini_voc, mini_datasets):
    # voc_aug.py's aug.txt lacks the VOC train ids: train_aug is train.txt (with
    # SegmentationClass) + aug.txt (with SegmentationClassAug).
    train, val = _config_datasets('voc12aug_473x473.py', mini_voc)
    assert len(val) == mini_datasets.VOC_COUNTS['val']
    assert len(train) == mini_datasets.VOC_COUNTS['trainaug']
