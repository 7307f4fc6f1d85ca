"""The pixel-space view reproduces mmseg's own test-time logits and predictions."""

import copy
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.registry import init_default_scope

from mmseg_robust.models import CheaperPasses, SegmentorPixelView, resolve_speedups
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


# ------------------------------------------------------------ cheaper passes
def _logits_and_grad(view, images):
    x = images.clone().requires_grad_(True)
    logits = view(x)
    loss = torch.nn.functional.cross_entropy(logits, view.labels)
    (grad,) = torch.autograd.grad(loss, x)
    return logits.detach(), grad


@pytest.mark.parametrize('speedups', [['channels_last'], ['channels_last', 'compile']])
def test_cheaper_passes_give_the_plain_logits_and_gradients(
    speedups, small_config, synthetic_root, one_thread
):
    """channels_last and torch.compile change the logits and input gradients
    only by float round-off, through the same padding/crop/resize path (a
    padded, resized batch), for a batch and a sub-batch of another shape; the
    model's weights are channels-last only inside ``applied`` and come back
    as the same Parameter objects in their own format. The compile test uses
    the aot_eager backend (inductor compiles for minutes on a small CPU; the
    benchmark uses it)."""
    model = _build(_model(small_config), dict(size_divisor=32))
    data = _batch(synthetic_root, resize=(48, 40))
    plain = SegmentorPixelView(model, copy.deepcopy(data))
    params = list(model.parameters())
    convs = [p for p in params if p.dim() == 4]
    passes = CheaperPasses(speedups, compile_options=dict(backend='aot_eager'))
    try:
        for n in (3, 1):  # the second batch size: another graph
            sub = dict(inputs=data['inputs'][:n], data_samples=data['data_samples'][:n])
            images = plain.images[:n]
            ref_logits, ref_grad = _logits_and_grad(
                SegmentorPixelView(model, copy.deepcopy(sub)), images
            )
            with passes.applied(model):
                assert all(
                    p.is_contiguous(memory_format=torch.channels_last) for p in convs
                )
                view = SegmentorPixelView(model, copy.deepcopy(sub), passes=passes)
                assert view.padding != (0, 0, 0, 0)  # the padding path is used
                logits, grad = _logits_and_grad(view, images)
            assert logits.dtype == torch.float32 and logits.is_contiguous()
            torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-3)
    finally:
        torch._dynamo.reset()
    assert list(model.parameters()) == params
    assert all(p.is_contiguous() for p in convs)
    assert all(p.grad is None for p in params)


def test_speedup_names_are_checked(repo_root):
    """Names as lists or comma text, each once, in a fixed order; unknown
    names fail naming the allowed ones, before a Runner (the preset);
    Corruptions does not take the option."""
    from mmseg_robust.engine import apply_robustness_evaluator

    assert resolve_speedups(None) == resolve_speedups('none') == ()
    assert resolve_speedups('bf16, channels_last') == ('channels_last', 'bf16')
    assert resolve_speedups(['compile', 'compile,bf16']) == ('compile', 'bf16')
    with pytest.raises(ValueError, match=r"unknown evaluator.speedups \['fp16'\]"):
        resolve_speedups(['channels_last', 'fp16'])
    with pytest.raises(ValueError, match="choose from.*'channels_last'"):
        resolve_speedups(3)
    path = osp.join(
        repo_root, 'configs', 'synthetic', 'upernet_convnext-micro_synthetic.py'
    )
    weights = [1] * 5
    cfg = apply_robustness_evaluator(
        Config.fromfile(path),
        dict(type='PGD', speedups='compile,channels_last', class_weights=weights),
    )
    assert cfg.test_cfg.speedups == ['channels_last', 'compile']
    with pytest.raises(ValueError, match='unknown evaluator.speedups'):
        apply_robustness_evaluator(
            Config.fromfile(path), dict(type='PGD', speedups=['fast'])
        )
    with pytest.raises(ValueError, match=r"does not take \['speedups'\]"):
        apply_robustness_evaluator(
            Config.fromfile(path), dict(type='Corruptions', speedups='bf16')
        )


def test_bf16_is_refused_off_a_bf16_gpu(small_config, synthetic_root):
    model = _build(_model(small_config))
    passes = CheaperPasses('bf16')
    with pytest.raises(ValueError, match="'bf16' needs a CUDA GPU.*on 'cpu'"):
        SegmentorPixelView(model, _batch(synthetic_root, n=1), passes=passes)
    with pytest.raises(ValueError, match='Remove bf16 from evaluator.speedups'):
        with passes.applied(model):
            pass


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
    reason='needs a GPU with bf16',
)
def test_bf16_logits_are_float32_and_close(small_config, synthetic_root):
    model = _build(_model(small_config)).cuda()
    data = _batch(synthetic_root)
    plain = SegmentorPixelView(model, copy.deepcopy(data))
    view = SegmentorPixelView(model, copy.deepcopy(data), passes=CheaperPasses('bf16'))
    ref, ref_grad = _logits_and_grad(plain, plain.images)
    logits, grad = _logits_and_grad(view, plain.images)
    assert logits.dtype == torch.float32 and grad.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: about 2-3 significant digits
    torch.testing.assert_close(logits, ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    assert (logits.argmax(1) == ref.argmax(1)).float().mean() > 0.95
