"""DDC-AT UPerNet head (docs/algorithms.md section 5.3 on mmseg's UPerHead): cls1 is the
plain UPerHead (``fpn_bottleneck`` + ``conv_seg``), export, end-to-end training."""

import importlib.util
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample

import mmseg_robust.models.decode_heads  # noqa: F401  (registers the heads)
from mmseg_robust.models.converters import (
    export_plain_state_dict,
    plain_head_cfg,
    plain_model_cfg,
)
from mmseg_robust.models.decode_heads import DDCAT_EXTRA_BRANCHES, DDCATUPerHead
from mmseg_robust.registry import MODELS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SYNTH = osp.join(REPO, 'configs', 'synthetic')
DDCAT_CONFIG = osp.join(SYNTH, 'upernet_convnext-micro_ddcat_synthetic.py')
SAT_CONFIG = osp.join(SYNTH, 'upernet_convnext-micro_sat_synthetic.py')


pytestmark = pytest.mark.usefixtures('one_thread_mmseg_scope')


def make_head(head_type='DDCATUPerHead', **kwargs):
    cfg = dict(
        type=head_type,
        in_channels=[4, 6, 8],
        in_index=[0, 1, 2],
        pool_scales=(1, 2),
        channels=4,
        num_classes=3,
        dropout_ratio=0.1,
        norm_cfg=dict(type='BN'),
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0),
    )
    cfg.update(kwargs)
    torch.manual_seed(0)
    head = MODELS.build(cfg)
    head.init_weights()
    return head


def features(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, s, s, generator=g) for c, s in ((4, 12), (6, 6), (8, 3))]


def samples(labels, division):
    out = []
    for i in range(labels.shape[0]):
        s = SegDataSample(metainfo=dict(img_shape=tuple(labels.shape[1:])))
        s.gt_sem_seg = PixelData(data=labels[i : i + 1].long())
        s.gt_division = PixelData(data=division[i : i + 1].long())
        out.append(s)
    return out


def test_branches_copy_fpn_bottleneck():
    head = make_head()
    assert isinstance(head, DDCATUPerHead)
    assert head.cls1_bottleneck is head.fpn_bottleneck
    ref = head.fpn_bottleneck.conv
    assert ref.in_channels == 3 * 4  # the FPN concatenation, not the PPM's
    for name in ('cls2_bottleneck', 'mask1_bottleneck'):
        conv = getattr(head, name).conv
        assert conv is not ref
        assert (
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.padding,
        ) == (ref.in_channels, ref.out_channels, ref.kernel_size, ref.padding)
        assert not torch.equal(conv.weight, ref.weight)
    # the plain UPerHead's keys are unchanged; the extra ones are the branches
    plain_keys = set(make_head('UPerHead').state_dict())
    extra = set(head.state_dict()) - plain_keys
    assert plain_keys <= set(head.state_dict())
    assert {k.split('.')[0] for k in extra} == set(DDCAT_EXTRA_BRANCHES)


@pytest.mark.parametrize('align_corners', [False, True])
def test_eval_forward_is_cls1_and_plain_uperhead(align_corners, tiny_models):
    head = tiny_models.trained_like(make_head(align_corners=align_corners))
    x = features()
    cls1, cls2, mask1 = head.branch_logits(x)
    assert cls1.shape == cls2.shape == (2, 3, 12, 12)
    assert mask1.shape == (2, 2, 12, 12)
    assert torch.equal(head(x), cls1) and not torch.equal(cls1, cls2)
    plain = make_head('UPerHead', align_corners=align_corners).eval()
    sd = {
        k: v
        for k, v in head.state_dict().items()
        if not k.startswith(('cls2', 'mask1'))
    }
    plain.load_state_dict(sd, strict=True)
    metas = [dict(img_shape=(47, 47), pad_shape=(47, 47))] * 2
    with torch.no_grad():
        assert torch.equal(head(x), plain(x))
        assert torch.equal(head.predict(x, metas, None), plain.predict(x, metas, None))


def test_routing_and_loss_shapes_and_gradients():
    head = make_head().train()
    x = features()
    routed = head.routed_logits(x)
    assert routed.shape == (2, 3, 12, 12)
    head.eval()
    with torch.no_grad():
        up = [
            F.interpolate(t, (45, 45), mode='bilinear', align_corners=False)
            for t in head.branch_logits(x)
        ]
        routed = head.routed_logits(x, size=(45, 45))
    m = up[2].argmax(1, keepdim=True) == 1
    assert torch.equal(routed, torch.where(m, up[1], up[0]))
    head.train()
    labels = torch.randint(0, 3, (2, 45, 45))
    labels[:, :4] = 255
    division = torch.randint(0, 2, (2, 45, 45))
    losses = head.loss(x, samples(labels, division), None)
    assert set(losses) == {'loss_ce', 'loss_mask', 'acc_seg', 'acc_mask'}
    assert all(torch.isfinite(v).all() for v in losses.values())
    head.zero_grad()
    losses['loss_ce'].backward(retain_graph=True)
    assert head.mask1.weight.grad is None or not head.mask1.weight.grad.any()
    assert head.fpn_bottleneck.conv.weight.grad.abs().sum() > 0
    losses['loss_mask'].backward()
    assert head.mask1.weight.grad.abs().sum() > 0
    assert head.mask1_bottleneck.conv.weight.grad.abs().sum() > 0


def test_config_is_sat_config_with_ddcat_head_and_scheme():
    ddcat, sat = Config.fromfile(DDCAT_CONFIG), Config.fromfile(SAT_CONFIG)
    assert ddcat.model.decode_head.type == 'DDCATUPerHead'
    assert ddcat.train_cfg.type == 'AdversarialTrainLoop'
    assert ddcat.train_cfg.scheme == 'ddcat'
    assert ddcat.train_cfg.attack == dict(type='BIM', eps=7.65, steps=3, step_size=2.55)
    assert ddcat.optim_wrapper.type == 'OptimWrapper'
    # everything else is the SAT config's (schedule, data, initialisation)
    ddcat, sat = ddcat.to_dict(), sat.to_dict()
    assert plain_model_cfg(ddcat.pop('model')) == sat.pop('model')
    assert {**ddcat.pop('train_cfg'), 'scheme': 'sat'} == sat.pop('train_cfg')
    assert ddcat == sat
    assert plain_head_cfg(
        dict(type='DDCATUPerHead', loss_mask_weight=1.0, channels=8)
    ) == dict(type='UPerHead', channels=8)


def test_export_gives_cls1_logits_exactly(tmp_path, tiny_models):
    cfg = Config.fromfile(DDCAT_CONFIG)
    model = tiny_models.trained_like(MODELS.build(cfg.model))
    x = torch.randn(2, 3, 40, 40)
    metas = [dict(img_shape=(40, 40), pad_shape=(40, 40))] * 2
    with torch.no_grad():
        feats = model.extract_feat(x)
        cls1 = F.interpolate(
            model.decode_head.branch_logits(feats)[0],
            (40, 40),
            mode='bilinear',
            align_corners=False,
        )
        routed = model.decode_head.routed_logits(feats, size=(40, 40))
        ours = model.encode_decode(x, metas)
    assert torch.equal(ours, cls1) and not torch.equal(ours, routed)
    # the export functions
    plain = MODELS.build(plain_model_cfg(cfg.model)).eval()
    assert type(plain.decode_head).__name__ == 'UPerHead'
    plain.load_state_dict(export_plain_state_dict(model.state_dict()), strict=True)
    with torch.no_grad():
        assert torch.equal(plain.encode_decode(x, metas), cls1)
    # the tool
    ckpt, out = tmp_path / 'iter_4.pth', tmp_path / 'plain.pth'
    torch.save(dict(meta=dict(iter=4), state_dict=model.state_dict()), ckpt)
    spec = importlib.util.spec_from_file_location(
        'export_ddcat_tool',
        osp.join(REPO, 'tools', 'model_converters', 'export_ddcat.py'),
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([DDCAT_CONFIG, str(ckpt), str(out)]) == 0
    plain_cfg = Config.fromfile(str(tmp_path / 'plain.py'))
    assert plain_cfg.model.decode_head.type == 'UPerHead'
    written = torch.load(out, map_location='cpu', weights_only=True)
    plain = MODELS.build(plain_cfg.model).eval()
    plain.load_state_dict(written['state_dict'], strict=True)
    with torch.no_grad():
        assert torch.equal(plain.encode_decode(x, metas), cls1)


def test_train_tool_trains_ddcat_upernet(
    run_tool, synthetic_root, data_options, tmp_path
):
    work = str(tmp_path / 'ddcat')
    out = run_tool(
        [
            'python',
            'tools/train.py',
            DDCAT_CONFIG,
            '--work-dir',
            work,
            '--cfg-options',
            'load_from=None',
            'train_cfg.max_iters=4',
            'train_cfg.val_interval=100',
            'default_hooks.checkpoint.interval=4',
            'default_hooks.logger.interval=1',
            'train_dataloader.batch_size=4',
        ]
        + data_options(synthetic_root)
    )
    assert 'Iter(train) [4/4]' in out
    assert 'decode.loss_mask' in out and 'decode.acc_mask' in out
    assert 'adv.acc' in out
    ckpt = torch.load(
        osp.join(work, 'iter_4.pth'), map_location='cpu', weights_only=True
    )
    assert any(k.startswith('decode_head.mask1.') for k in ckpt['state_dict'])
