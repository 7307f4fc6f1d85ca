"""The pixel-space view reproduces mmseg's own test-time logits and predictions."""

import copy

import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.registry import init_default_scope

from mmseg_robust.models import SegmentorPixelView
from mmseg_robust.registry import DATASETS, MODELS


def _model(small_config, **test_cfg):
    init_default_scope('mmseg')
    cfg = Config.fromfile(small_config)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.test_cfg = dict(mode='whole', **test_cfg)
    return model_cfg


def _build(model_cfg, pre_test_cfg=None, raw_input=False):
    if pre_test_cfg is not None:
        model_cfg.data_preprocessor['test_cfg'] = pre_test_cfg
    if raw_input:  # the PIR-AT convention: raw [0, 1] input, no mean/std
        model_cfg.data_preprocessor.update(mean=None, std=None)
    torch.manual_seed(0)
    model = MODELS.build(model_cfg)
    model.init_weights()
    return model.eval()


def _batch(synthetic_root, resize=None, n=3):
    pipeline = [dict(type='LoadImageFromFile')]
    if resize:
        pipeline.append(dict(type='Resize', scale=resize, keep_ratio=False))
    pipeline += [dict(type='LoadAnnotations'), dict(type='PackSegInputs')]
    ds = DATASETS.build(
        dict(
            type='SyntheticShapesDataset',
            data_root=synthetic_root,
            generator_cfg=dict(splits=dict(train=48, val=16)),
            data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
            pipeline=pipeline,
        )
    )
    return pseudo_collate([ds[i] for i in range(n)])


CASES = {
    'whole': (dict(), None, None, False),
    'slide': (
        dict(mode='slide', crop_size=(32, 32), stride=(24, 24)),
        None,
        None,
        False,
    ),
    'padding': (dict(), dict(size_divisor=32), (48, 40), False),
    'resized_raw_input': (dict(), None, (40, 40), True),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_view_matches_mmseg_test_step(case, small_config, synthetic_root):
    test_cfg, pre_test_cfg, resize, raw = CASES[case]
    model_cfg = _model(small_config)
    model_cfg.test_cfg.update(test_cfg)
    model = _build(model_cfg, pre_test_cfg, raw)
    data = _batch(synthetic_root, resize)
    with torch.no_grad():
        expected = model.test_step(copy.deepcopy(data))
        view = SegmentorPixelView(model, copy.deepcopy(data))
        logits = view(view.images)
    ref_logits = torch.stack([s.seg_logits.data for s in expected])
    ref_pred = torch.stack([s.pred_sem_seg.data[0] for s in expected])
    assert logits.shape == ref_logits.shape
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert (logits.argmax(1) == ref_pred).float().mean() > 0.999
    # labels at the original size, images in [0, 1] without padding
    assert view.labels.shape == ref_pred.shape
    assert view.images.min() >= 0 and view.images.max() <= 1
    h, w = data['inputs'][0].shape[1:]
    assert view.images.shape[2:] == (h, w)


def test_view_images_are_the_rgb_pixels(small_config, synthetic_root):
    model = _build(_model(small_config))
    data = _batch(synthetic_root)
    view = SegmentorPixelView(model, copy.deepcopy(data))
    bgr = torch.stack(data['inputs']).float()
    rgb = bgr[:, [2, 1, 0]] / 255.0  # the preprocessor converts BGR -> RGB
    torch.testing.assert_close(view.images, rgb, atol=1e-5, rtol=0)


def test_view_gradients_reach_pixels_only(small_config, synthetic_root):
    model = _build(_model(small_config))
    view = SegmentorPixelView(model, _batch(synthetic_root))
    x = view.images.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(view(x), view.labels)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_batch_with_different_shapes_is_refused(small_config, synthetic_root):
    model = _build(_model(small_config))
    data = _batch(synthetic_root, n=2)
    data['data_samples'][1].set_metainfo(dict(ori_shape=(60, 64)))
    with pytest.raises(ValueError, match='batch_size=1'):
        SegmentorPixelView(model, data)
