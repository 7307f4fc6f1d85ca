"""SAT and DDC-AT configs (docs/algorithms.md sections 5.2, 5.3): settings of the
reference, every model builds and trains one step on a small input, and every
training config has a `*_reference-protocol` twin that evaluates with the
reference's test protocol (tests/test_slide_softmax.py checks that protocol)."""

import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample

import mmseg_robust.models.decode_heads  # noqa: F401  (registers the heads)
from mmseg_robust.models.converters import plain_model_cfg
from mmseg_robust.registry import MODELS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PROTOCOL = '_reference-protocol.py'
CONFIGS = sorted(
    p
    for p in glob.glob(osp.join(REPO, 'configs', 'sat', '*.py'))
    + glob.glob(osp.join(REPO, 'configs', 'ddcat', '*.py'))
    if not p.endswith(PROTOCOL)
)
IDS = [osp.join(*c.split(osp.sep)[-2:]) for c in CONFIGS]


pytestmark = pytest.mark.usefixtures('one_thread_mmseg_scope')


def test_all_eight_configs_exist():
    names = {osp.basename(c) for c in CONFIGS}
    for scheme in ('sat', 'ddcat'):
        for arch in ('pspnet', 'deeplabv3'):
            assert f'{arch}_r50-d8_{scheme}_voc12aug-473x473.py' in names
            assert f'{arch}_r50-d8_{scheme}_cityscapes-449x449.py' in names


@pytest.mark.parametrize('path', CONFIGS, ids=IDS)
def test_config_settings(path):
    cfg = Config.fromfile(path)
    scheme = 'ddcat' if '_ddcat_' in path else 'sat'
    voc = 'voc12aug' in path
    crop = 473 if voc else 449
    # adversarial training: BIM eps 0.03, 3 steps of 0.01, in /255 units
    assert cfg.train_cfg.type == 'AdversarialTrainLoop'
    assert cfg.train_cfg.scheme == scheme
    assert cfg.train_cfg.attack == dict(type='BIM', eps=7.65, steps=3, step_size=2.55)
    # 50 epochs of 661 (VOC) / 400 epochs of 186 (Cityscapes) iterations
    max_iters = 33050 if voc else 74400
    assert cfg.train_cfg.max_iters == max_iters
    # SGD 0.01, momentum 0.9, wd 1e-4, heads 10x, poly 0.9
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    assert cfg.optim_wrapper.optimizer == dict(
        type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4
    )
    keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
    assert keys.decode_head.lr_mult == keys.auxiliary_head.lr_mult == 10.0
    (sched,) = cfg.param_scheduler
    assert (sched.type, sched.power, sched.end) == ('PolyLR', 0.9, max_iters)
    # batch 16 = 2 per GPU x 8
    assert cfg.train_dataloader.batch_size == 2
    dataset = cfg.train_dataloader.dataset
    # VOC: train.txt + aug.txt (ConcatDataset of two datasets, one pipeline)
    pipeline = (dataset.datasets[0] if voc else dataset).pipeline
    assert [t for t in pipeline if t.type == 'RandomCrop'][0].crop_size == (crop, crop)
    model = cfg.model
    assert model.data_preprocessor.mean == [123.675, 116.28, 103.53]
    assert model.data_preprocessor.std == [58.395, 57.12, 57.375]
    assert model.data_preprocessor.size == (crop, crop)
    # deep-stem ResNet-50, output stride 8, every layer3/4 block dilated
    bb = model.backbone
    assert (bb.type, bb.depth, bb.stem_channels) == ('ResNetV1c', 50, 128)
    assert bb.strides == (1, 2, 1, 1) and bb.dilations == (1, 1, 2, 4)
    assert bb.contract_dilation is False
    head, aux = model.decode_head, model.auxiliary_head
    assert head.num_classes == aux.num_classes == (21 if voc else 19)
    assert head.align_corners and aux.align_corners
    assert aux.type == 'FCNHead' and aux.loss_decode.loss_weight == 0.4
    if 'deeplabv3' in path:
        assert head.dilations == (1, 6, 12, 18)
        assert head.bottleneck_kernel_size == 1 and head.channels == 256
        assert head.type == ('DDCATASPPHead' if scheme == 'ddcat' else 'DeepLabV3Head')
    else:
        assert head.pool_scales == (1, 2, 3, 6) and head.channels == 512
        assert head.type == ('DDCATPSPHead' if scheme == 'ddcat' else 'PSPHead')
    if scheme == 'ddcat':
        assert head.loss_mask_weight == 1.0
        # deployment: the exported model is exactly the SAT config's model
        sat = Config.fromfile(path.replace('ddcat', 'sat'))
        assert plain_model_cfg(model.to_dict()) == sat.model.to_dict()


def _samples(n, size, num_classes, division):
    out = []
    for _ in range(n):
        s = SegDataSample(metainfo=dict(img_shape=size, pad_shape=size, ori_shape=size))
        labels = torch.randint(0, num_classes, (1, *size))
        labels[:, :2] = 255
        s.gt_sem_seg = PixelData(data=labels)
        if division:
            s.gt_division = PixelData(data=torch.randint(0, 2, (1, *size)))
        out.append(s)
    return out


@pytest.mark.parametrize('path', CONFIGS, ids=IDS)
def test_model_builds_and_trains_one_step(path):
    cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg = None  # no ImageNet file in the tests
    ddcat = '_ddcat_' in path
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.train()
    x = torch.randn(2, 3, 33, 33)
    n_cls = cfg.model.decode_head.num_classes
    losses = model.loss(x, _samples(2, (33, 33), n_cls, ddcat))
    expected = {'decode.loss_ce', 'aux.loss_ce'}
    expected |= {'decode.loss_mask'} if ddcat else set()
    assert expected <= set(losses)
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0
    if ddcat:
        assert model.decode_head.mask1.weight.grad.abs().sum() > 0
        with pytest.raises(ValueError, match='AdversarialTrainLoop'):
            model.loss(x, _samples(2, (33, 33), n_cls, False))
    model.eval()
    with torch.no_grad():
        logits = model.encode_decode(
            x, [dict(img_shape=(33, 33), pad_shape=(33, 33))] * 2
        )
    assert logits.shape == (2, n_cls, 33, 33)


@pytest.mark.parametrize('path', CONFIGS, ids=IDS)
def test_reference_protocol_config(path):
    """The twin changes the evaluation only: SlideSoftmaxEncoderDecoder in mode
    'slide_softmax' with the training crop, the dataset's reference pipeline."""
    twin = path[:-3] + PROTOCOL
    assert osp.isfile(twin), f'{osp.basename(twin)} is missing'
    base = Config.fromfile(path).to_dict()
    cfg = Config.fromfile(twin).to_dict()
    voc = 'voc12aug' in path
    crop = (473, 473) if voc else (449, 449)
    assert {k for k in set(base) | set(cfg) if base.get(k) != cfg.get(k)} == {
        'model',
        'val_dataloader',
        'test_dataloader',
    }
    model = dict(base['model'], type='SlideSoftmaxEncoderDecoder')
    model['test_cfg'] = dict(
        mode='slide_softmax', crop_size=crop, stride_rate=2 / 3, flip=True
    )
    assert cfg['model'] == model
    # mmseg's slide inference uses the same windows: stride = ceil(2/3 crop)
    assert base['model']['test_cfg']['stride'] == ((316, 316) if voc else (300, 300))
    if voc:
        pipeline = [
            dict(type='LoadImageFromFile', to_float32=True),
            dict(type='Resize', scale=(512, 512), keep_ratio=True),
            dict(type='LoadAnnotations'),
            dict(type='PackSegInputs'),
        ]
    else:
        pipeline = [
            dict(type='LoadImageFromFile', to_float32=True),
            dict(type='LoadAnnotations'),
            dict(type='Resize', scale=(1024, 512), keep_ratio=False),
            dict(type='ScoreAtImageShape'),
            dict(type='PackSegInputs'),
        ]
    for loader in ('val_dataloader', 'test_dataloader'):
        dataset = dict(base[loader]['dataset'], pipeline=pipeline)
        assert cfg[loader] == dict(base[loader], dataset=dataset)
    text = open(twin).read()
    assert 'slide inference' in text and 'section 5.2' in text
    if voc:
        assert 'at least 773 of the\n# 1,449 VOC2012 val images' in text
        assert 'at least 773 of the\n# 1,449 VOC2012 val images' in open(path).read()
