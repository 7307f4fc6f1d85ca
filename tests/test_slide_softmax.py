"""The SAT/DDC-AT test protocol (docs/algorithms.md section 5.2):
``SlideSoftmaxEncoderDecoder`` with ``test_cfg.mode='slide_softmax'`` against a
port of the reference's test script (numpy/OpenCV, written here from its
description), in the predict path and in the pixel-space view; the
``*_reference-protocol`` configs end to end through tools/test.py on miniature
VOC and Cityscapes trees.
"""

import copy
import glob
import json
import os.path as osp

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config, ConfigDict
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample
from PIL import Image

import mmseg_robust.datasets  # noqa: F401  (registers ScoreAtImageShape)
import mmseg_robust.models  # noqa: F401  (registers the segmentor, DDC-AT heads)
from mmseg_robust.models import SegmentorPixelView
from mmseg_robust.registry import MODELS, TRANSFORMS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
MEAN = np.array([123.675, 116.28, 103.53])  # ImageNet, RGB, 0..255
STD = np.array([58.395, 57.12, 57.375])


pytestmark = pytest.mark.usefixtures('one_thread_mmseg_scope')


# ----------------------------------------------------------------------------
# A port of the reference's test script (semseg toolbox), from its description
# ----------------------------------------------------------------------------
def ref_net_process(net, image, mean, std):
    """(h, w, 3) float RGB 0..255 -> (h, w, K) probabilities, window + mirror."""
    x = torch.from_numpy(image.transpose((2, 0, 1)).copy()).float()
    for t, m, s in zip(x, mean, std):
        t.sub_(m).div_(s)
    x = x.unsqueeze(0)
    x = torch.cat([x, x.flip(3)], 0)
    with torch.no_grad():
        output = net(x)
    _, _, h_i, w_i = x.shape
    _, _, h_o, w_o = output.shape
    if (h_o != h_i) or (w_o != w_i):
        output = F.interpolate(output, (h_i, w_i), mode='bilinear', align_corners=True)
    output = F.softmax(output, dim=1)
    output = (output[0] + output[1].flip(2)) / 2
    return output.numpy().transpose(1, 2, 0)


def ref_scale_process(net, image, classes, crop_h, crop_w, h, w, mean, std):
    stride_rate = 2 / 3
    ori_h, ori_w, _ = image.shape
    pad_h = max(crop_h - ori_h, 0)
    pad_w = max(crop_w - ori_w, 0)
    pad_h_half = int(pad_h / 2)
    pad_w_half = int(pad_w / 2)
    if pad_h > 0 or pad_w > 0:
        image = cv2.copyMakeBorder(
            image,
            pad_h_half,
            pad_h - pad_h_half,
            pad_w_half,
            pad_w - pad_w_half,
            cv2.BORDER_CONSTANT,
            value=[float(m) for m in mean],
        )
    new_h, new_w, _ = image.shape
    stride_h = int(np.ceil(crop_h * stride_rate))
    stride_w = int(np.ceil(crop_w * stride_rate))
    grid_h = int(np.ceil(float(new_h - crop_h) / stride_h) + 1)
    grid_w = int(np.ceil(float(new_w - crop_w) / stride_w) + 1)
    prediction_crop = np.zeros((new_h, new_w, classes), dtype=float)
    count_crop = np.zeros((new_h, new_w), dtype=float)
    for index_h in range(0, grid_h):
        for index_w in range(0, grid_w):
            s_h = index_h * stride_h
            e_h = min(s_h + crop_h, new_h)
            s_h = e_h - crop_h
            s_w = index_w * stride_w
            e_w = min(s_w + crop_w, new_w)
            s_w = e_w - crop_w
            image_crop = image[s_h:e_h, s_w:e_w].copy()
            count_crop[s_h:e_h, s_w:e_w] += 1
            prediction_crop[s_h:e_h, s_w:e_w, :] += ref_net_process(
                net, image_crop, mean, std
            )
    prediction_crop /= np.expand_dims(count_crop, 2)
    prediction_crop = prediction_crop[
        pad_h_half : pad_h_half + ori_h, pad_w_half : pad_w_half + ori_w
    ]
    return cv2.resize(prediction_crop, (w, h), interpolation=cv2.INTER_LINEAR)


def ref_voc_probs(net, image, classes, crop, base_size=512):
    """VOC: long side resized to base_size, probabilities at the original size."""
    h, w, _ = image.shape
    long_size = round(1.0 * base_size)
    new_h = new_w = long_size
    if h > w:
        new_w = round(long_size / float(h) * w)
    else:
        new_h = round(long_size / float(w) * h)
    image_scale = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return ref_scale_process(net, image_scale, classes, *crop, h, w, MEAN, STD)


def ref_cityscapes_probs(net, image, classes, crop):
    """Cityscapes: image resized to 1024x512, probabilities at 1024x512."""
    image = cv2.resize(image, (1024, 512), interpolation=cv2.INTER_LINEAR)
    return ref_scale_process(net, image, classes, *crop, 512, 1024, MEAN, STD)


# ----------------------------------------------------------------------------
# A small model
# ----------------------------------------------------------------------------
def _tiny_model(tiny_models, head, crop, num_classes=5, mode='slide_softmax'):
    cfg = tiny_models.tiny_segmentor_cfg(head, num_classes=num_classes)
    cfg['type'] = 'SlideSoftmaxEncoderDecoder'
    cfg['test_cfg'] = dict(mode=mode, crop_size=crop, stride_rate=2 / 3, flip=True)
    model = MODELS.build(cfg)
    tiny_models.trained_like(model)
    return _calibrated(model)


def _calibrated(model, scale=8.0):
    """Scale the classifier so that the logits are at most about ``scale``: the
    random trained-like weights give logits in the thousands, whose float32
    round-off (e.g. of the pixel view's [0, 1] round trip) would dominate the
    comparisons."""
    model.eval()
    x = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        factor = scale / _net(model)(x).abs().max()
        model.decode_head.conv_seg.weight.mul_(factor)
        model.decode_head.conv_seg.bias.mul_(factor)
    return model


def _net(model):
    """The network as the reference calls it: logits at the decoder resolution."""
    return lambda x: model.decode_head.forward(model.extract_feat(x))


def _data(image_rgb, ori_shape):
    """A test batch of one float image (the loader's BGR channel order)."""
    bgr = np.ascontiguousarray(image_rgb[..., ::-1])
    sample = SegDataSample(
        metainfo=dict(
            ori_shape=tuple(ori_shape),
            img_shape=bgr.shape[:2],
            pad_shape=bgr.shape[:2],
        )
    )
    label = torch.zeros((1, *ori_shape), dtype=torch.long)
    sample.gt_sem_seg = PixelData(data=label)
    return dict(
        inputs=[torch.from_numpy(bgr.transpose(2, 0, 1).copy())],
        data_samples=[sample],
    )


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    # smooth content (a random field, upsampled) plus noise, 0..255 float
    field = rng.uniform(0, 255, (4, 5, 3)).astype(np.float32)
    img = cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC)
    img = img + rng.normal(0, 20, (h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.float32)


HEADS = ['PSPHead', 'DDCATPSPHead', 'DDCATASPPHead']
CROP = (33, 41)
# (original h, w) -> resized h, w (the test resolution) and the case:
CASES = [
    # smaller than the crop in both dimensions: mean padding, one window;
    # resized up to the output size
    ((20, 30), (15, 22)),
    # smaller in width only; output larger in both
    ((60, 30), (50, 30)),
    # larger: 3 x 3 windows overlapping, output smaller (downscaling)
    ((64, 80), (70, 90)),
]


@pytest.mark.parametrize('head', HEADS)
@pytest.mark.parametrize('ori_shape, size', CASES, ids=['pad', 'pad-w', 'windows'])
def test_slide_softmax_equals_the_reference_port(tiny_models, head, ori_shape, size):
    torch.manual_seed(0)
    model = _tiny_model(tiny_models, head, CROP)
    image = _image(*size, seed=1)
    oh, ow = ori_shape
    expected = ref_scale_process(
        _net(model), image, 5, *CROP, oh, ow, MEAN, STD
    )  # (oh, ow, K)
    data = _data(image, ori_shape)
    with torch.no_grad():
        (out,) = model.test_step(copy.deepcopy(data))
    probs = out.seg_logits.data.exp().numpy().transpose(1, 2, 0)
    assert probs.shape == expected.shape
    np.testing.assert_allclose(probs, expected, rtol=0, atol=2e-6)
    pred = out.pred_sem_seg.data[0].numpy()
    np.testing.assert_array_equal(pred, expected.argmax(2))
    assert len(np.unique(pred)) > 1  # not a constant prediction

    # The pixel-space view (what the attacks differentiate) gives the same
    view = SegmentorPixelView(model, copy.deepcopy(data))
    images = view.images.clone().requires_grad_(True)
    logits = view(images)
    np.testing.assert_allclose(
        logits.detach().exp()[0].numpy().transpose(1, 2, 0),
        expected,
        rtol=0,
        atol=2e-6,
    )
    F.cross_entropy(logits, torch.from_numpy(expected.argmax(2))[None]).backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_mmseg_slide_inference_differs_from_the_reference(tiny_models):
    """The same model and windows with mmseg's slide inference (logit average,
    no mean padding, no flip, logits resized): not the reference's numbers."""
    torch.manual_seed(0)
    model = _tiny_model(tiny_models, 'PSPHead', CROP)
    image = _image(20, 30, seed=1)
    expected = ref_scale_process(_net(model), image, 5, *CROP, 20, 30, MEAN, STD)
    model.test_cfg = ConfigDict(mode='slide', crop_size=CROP, stride=(22, 28))
    with torch.no_grad():
        (out,) = model.test_step(_data(image, (20, 30)))
    probs = out.seg_logits.data.softmax(0).numpy().transpose(1, 2, 0)
    assert np.abs(probs - expected).max() > 1e-2


@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_other_modes_are_mmseg_encoder_decoder(tiny_models, mode):
    torch.manual_seed(0)
    cfg = tiny_models.tiny_segmentor_cfg('PSPHead', num_classes=5)
    cfg['test_cfg'] = (
        dict(mode='slide', crop_size=CROP, stride=(22, 28))
        if mode == 'slide'
        else dict(mode='whole')
    )
    cfg = ConfigDict(cfg)
    plain = tiny_models.trained_like(MODELS.build(cfg))
    ours = MODELS.build(ConfigDict(cfg, type='SlideSoftmaxEncoderDecoder'))
    ours.load_state_dict(plain.state_dict())
    ours.eval()
    data = _data(_image(50, 70, seed=2), (40, 60))
    with torch.no_grad():
        (a,) = plain.test_step(copy.deepcopy(data))
        (b,) = ours.test_step(copy.deepcopy(data))
    torch.testing.assert_close(a.seg_logits.data, b.seg_logits.data, rtol=0, atol=0)


def test_bad_test_cfg_is_refused(tiny_models):
    cfg = tiny_models.tiny_segmentor_cfg('PSPHead')
    cfg['type'] = 'SlideSoftmaxEncoderDecoder'
    with pytest.raises(ValueError, match='stride_rate'):
        MODELS.build(
            dict(
                cfg,
                test_cfg=dict(mode='slide_softmax', crop_size=CROP, stride=(2, 2)),
            )
        )
    with pytest.raises(ValueError, match='crop_size'):
        MODELS.build(dict(cfg, test_cfg=dict(mode='slide_softmax')))


def test_score_at_image_shape():
    t = TRANSFORMS.build(dict(type='ScoreAtImageShape'))
    label = np.zeros((512, 1024), np.uint8)
    out = t(
        dict(
            img=np.zeros((512, 1024, 3), np.float32),
            img_shape=(512, 1024),
            ori_shape=(1024, 2048),
            gt_seg_map=label,
            seg_fields=['gt_seg_map'],
        )
    )
    assert out['ori_shape'] == (512, 1024)
    with pytest.raises(ValueError, match='LoadAnnotations before the Resize'):
        t(
            dict(
                img_shape=(512, 1024),
                ori_shape=(1024, 2048),
                gt_seg_map=np.zeros((1024, 2048), np.uint8),
                seg_fields=['gt_seg_map'],
            )
        )


# ----------------------------------------------------------------------------
# The *_reference-protocol configs through tools/test.py
# ----------------------------------------------------------------------------
def _write_checkpoint(tiny_models, config, path):
    """The shrunk config's model with random trained-like weights, saved."""
    from mmengine.model import revert_sync_batchnorm

    torch.manual_seed(0)
    model = revert_sync_batchnorm(MODELS.build(Config.fromfile(config).model))
    # small logits: a window and its mirror confidently predicting two different
    # classes would average to exact 0.5 / 0.5 ties
    _calibrated(tiny_models.trained_like(model), scale=2.0)
    with torch.no_grad():
        # favour class 0 (VOC background, Cityscapes road) so that the mIoU
        # against the labels is clearly above 0
        model.decode_head.conv_seg.bias[0] += 20.0
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return model


def _miou(preds, labels, num_classes):
    """mIoU (%) as mmseg's IoUMetric: pooled over images, classes with an
    empty union left out, 255 ignored."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for pred, label in zip(preds, labels):
        valid = label != 255
        p, t = pred[valid], label[valid]
        for c in range(num_classes):
            inter[c] += np.sum((p == c) & (t == c))
            union[c] += np.sum((p == c) | (t == c))
    with np.errstate(invalid='ignore', divide='ignore'):
        return float(np.nanmean(inter / np.where(union > 0, union, np.nan)) * 100)


def _dataset_files(cfg, root):
    """(image path, label path, output name) of the test split, in order."""
    from mmseg_robust.registry import DATASETS

    dataset = DATASETS.build(
        dict(cfg.test_dataloader.dataset, data_root=root, pipeline=[])
    )
    out = []
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        name = osp.splitext(osp.basename(info['img_path']))[0] + '.png'
        out.append((info['img_path'], info['seg_map_path'], name))
    return out


PROTOCOL_E2E = [
    ('configs/sat/pspnet_r50-d8_sat_voc12aug-473x473_reference-protocol.py', 'voc'),
    (
        'configs/ddcat/deeplabv3_r50-d8_ddcat_cityscapes-449x449_reference-protocol.py',
        'cityscapes',
    ),
]


@pytest.mark.parametrize('config, dataset', PROTOCOL_E2E, ids=['voc', 'cityscapes'])
def test_reference_protocol_config_end_to_end(
    config,
    dataset,
    request,
    tmp_path,
    tiny_models,
    real_data_matrix,
    tools_in_one_process,
    reset_mmengine,
):
    """tools/test.py with a reference-protocol config (the model shrunk) on a
    miniature dataset: every prediction equals the reference port's, at the
    reference's resolution (VOC: the original image; Cityscapes: 1024x512), the
    mIoU is the port's against the reference's labels; then SEA runs on it."""
    matrix = real_data_matrix
    root = request.getfixturevalue('mini_' + dataset)
    path = osp.join(REPO, config)
    cfg = Config.fromfile(path)
    child = matrix.write_child(tmp_path, path, 'child.py', matrix._model_shrink(cfg))
    ckpt = str(tmp_path / 'model.pth')
    model = _write_checkpoint(tiny_models, child, ckpt)
    num_classes = model.decode_head.num_classes
    work, preds_dir = tmp_path / 'test', tmp_path / 'preds'
    options = matrix.data_root_options(cfg, root)
    matrix._run_tools(
        tools_in_one_process,
        [
            osp.join(REPO, 'tools', 'test.py'),
            child,
            ckpt,
            '--work-dir',
            work,
            '--out',
            preds_dir,
            '--cfg-options',
            *options,
        ],
    )
    crop = tuple(cfg.model.test_cfg.crop_size)
    files = _dataset_files(cfg, root)
    assert len(files) >= 3
    port_preds, labels = [], []
    for img_path, seg_path, name in files:
        image = cv2.cvtColor(cv2.imread(img_path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        image = image.astype(np.float32)
        # as mmseg's LoadAnnotations: the PNG's values (VOC: palette indices)
        label = np.asarray(Image.open(seg_path))
        if dataset == 'voc':
            probs = ref_voc_probs(_net(model), image, num_classes, crop)
        else:
            probs = ref_cityscapes_probs(_net(model), image, num_classes, crop)
            label = cv2.resize(label, (1024, 512), interpolation=cv2.INTER_NEAREST)
        ours = cv2.imread(str(preds_dir / name), cv2.IMREAD_GRAYSCALE)
        assert ours.shape == probs.shape[:2] == label.shape
        port = probs.argmax(2)
        # pixels whose two best probabilities are closer than float32 round-off
        # may go either way
        top2 = np.sort(probs, axis=2)[..., -2:]
        clear = top2[..., 1] - top2[..., 0] > 1e-5
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(ours[clear], port[clear])
        assert len(np.unique(port)) > 1
        port_preds.append(port)
        labels.append(label)
    logs = sorted(glob.glob(str(work / '*' / '*.json')))
    assert logs, f'no metrics JSON under {work}'
    with open(logs[-1]) as f:
        metrics = json.load(f)
    assert metrics['mIoU'] > 0.2
    assert metrics['mIoU'] == pytest.approx(
        _miou(port_preds, labels, num_classes), abs=0.011
    )

    # An attack evaluator on the same protocol: SEA, a few iterations, one image.
    matrix._run_tools(
        tools_in_one_process,
        [
            osp.join(REPO, 'tools', 'test.py'),
            child,
            ckpt,
            '--work-dir',
            tmp_path / 'sea',
            '--cfg-options',
            *options,
            'test_dataloader.dataset.indices=1',
            *matrix.EVALUATOR_SEA,
        ],
    )
    (result,) = glob.glob(str(tmp_path / 'sea' / 'robustness_*.json'))
    with open(result) as f:
        result = json.load(f)
    matrix._check_sea(result, num_images=1)
    assert result['summary']['clean']['mIoU'] == pytest.approx(
        _miou(port_preds[:1], labels[:1], num_classes), abs=1e-6
    )
