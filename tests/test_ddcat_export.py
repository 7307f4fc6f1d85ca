"""Export of DDC-AT models as plain PSPNet / DeepLabv3 (cls1 only)."""
import importlib.util
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import DefaultScope

import mmseg_robust.models.decode_heads  # noqa: F401  (registers the heads)
from mmseg_robust.models.converters import (export_plain_state_dict,
                                            plain_head_cfg, plain_model_cfg)
from mmseg_robust.registry import MODELS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread_mmseg_scope():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with DefaultScope.overwrite_default_scope('mmseg'):
        yield
    torch.set_num_threads(before)


def ddcat_model_cfg(head_type):
    """A narrow DDC-AT segmentor (the layout of configs/ddcat at width 8/64)."""
    norm = dict(type='BN', requires_grad=True)
    head = dict(
        type=head_type,
        in_channels=64,
        in_index=3,
        channels=16,
        dropout_ratio=0.1,
        num_classes=4,
        norm_cfg=norm,
        align_corners=True)
    if head_type == 'DDCATASPPHead':
        head['dilations'] = (1, 2, 3, 4)
    return dict(
        type='EncoderDecoder',
        data_preprocessor=dict(
            type='SegDataPreProcessor',
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            bgr_to_rgb=True),
        backbone=dict(
            type='ResNetV1c',
            depth=50,
            stem_channels=8,
            base_channels=2,
            dilations=(1, 1, 2, 4),
            strides=(1, 2, 1, 1),
            norm_cfg=norm,
            contract_dilation=False),
        decode_head=head,
        auxiliary_head=dict(
            type='FCNHead',
            in_channels=32,
            in_index=2,
            channels=8,
            num_convs=1,
            concat_input=False,
            num_classes=4,
            norm_cfg=norm,
            align_corners=True),
        train_cfg=dict(),
        test_cfg=dict(mode='whole'))


def trained_like(model):
    """Random weights everywhere, BN statistics included (not the init)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.3)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_plain_head_cfg():
    assert plain_head_cfg(dict(type='DDCATPSPHead', loss_mask_weight=1.0,
                               channels=8)) == dict(type='PSPHead', channels=8)
    assert plain_head_cfg(dict(type='DDCATASPPHead')) == dict(
        type='DeepLabV3Head', bottleneck_kernel_size=1)
    assert plain_head_cfg(
        dict(type='mmseg.DDCATASPPHead',
             bottleneck_kernel_size=3)) == dict(type='mmseg.ASPPHead')
    with pytest.raises(ValueError, match='not a DDC-AT decode head'):
        plain_head_cfg(dict(type='PSPHead'))


@pytest.mark.parametrize('head_type', ['DDCATPSPHead', 'DDCATASPPHead'])
def test_exported_model_gives_cls1_logits_exactly(head_type):
    cfg = ddcat_model_cfg(head_type)
    model = trained_like(MODELS.build(cfg))
    plain = MODELS.build(plain_model_cfg(cfg)).eval()
    sd = export_plain_state_dict(model.state_dict())
    assert not any('cls2' in k or 'mask1' in k for k in sd)
    plain.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 33, 33)
    metas = [dict(img_shape=(33, 33), pad_shape=(33, 33))] * 2
    with torch.no_grad():
        cls1 = model.decode_head.branch_logits(model.extract_feat(x))[0]
        cls1 = nn.functional.interpolate(
            cls1, (33, 33), mode='bilinear', align_corners=True)
        ours = model.encode_decode(x, metas)
        exported = plain.encode_decode(x, metas)
        routed = model.decode_head.routed_logits(
            model.extract_feat(x), size=(33, 33))
    assert torch.equal(exported, ours) and torch.equal(exported, cls1)
    assert not torch.equal(exported, routed)  # the routing was really dropped
    with pytest.raises(ValueError, match='not a DDC-AT checkpoint'):
        export_plain_state_dict(sd)


def test_export_tool(tmp_path, capsys):
    cfg = Config(
        dict(
            default_scope='mmseg',
            custom_imports=dict(imports=['mmseg_robust']),
            model=ddcat_model_cfg('DDCATASPPHead'),
            train_cfg=dict(
                type='AdversarialTrainLoop', scheme='ddcat', max_iters=10)))
    cfg_path, ckpt_path = tmp_path / 'ddcat.py', tmp_path / 'iter_10.pth'
    cfg.dump(str(cfg_path))
    model = trained_like(MODELS.build(cfg.model))
    torch.save(
        dict(
            meta=dict(iter=10, dataset_meta=dict(classes=('a', 'b', 'c', 'd'))),
            state_dict=model.state_dict()), ckpt_path)
    path = osp.join(REPO, 'tools', 'model_converters', 'export_ddcat.py')
    spec = importlib.util.spec_from_file_location('export_ddcat_tool', path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / 'plain.pth'
    assert tool.main([str(cfg_path), str(ckpt_path), str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        f'wrote plain checkpoint: {out}',
        f'wrote plain config: {tmp_path / "plain.py"}'
    ]
    plain_cfg = Config.fromfile(str(tmp_path / 'plain.py'))
    assert plain_cfg.model.decode_head.type == 'DeepLabV3Head'
    written = torch.load(out, map_location='cpu', weights_only=True)
    assert written['meta']['dataset_meta']['classes'] == ('a', 'b', 'c', 'd')
    assert 'decode_head.mask1.weight' in written['meta']['ddcat_export']['dropped']
    plain = MODELS.build(plain_cfg.model).eval()
    plain.load_state_dict(written['state_dict'], strict=True)
    x = torch.randn(1, 3, 25, 25)
    metas = [dict(img_shape=(25, 25), pad_shape=(25, 25))]
    with torch.no_grad():
        assert torch.equal(
            plain.encode_decode(x, metas), model.encode_decode(x, metas))
