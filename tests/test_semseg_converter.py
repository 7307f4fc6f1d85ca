"""Converter of DDC-AT / SAT reference checkpoints (semseg naming) to mmseg.

The reference architecture is rebuilt here from its description (docs/algorithms.md
sections 5.3 and 7; hszhao/semseg's PSPNet / DeepLabv3 on a deep-stem ResNet-50) at
a width parameter ``w`` (64 = the real model): at w=64 on the meta device it gives
the exact reference key names and shapes, at a small width it runs, and the
converted mmseg model must reproduce its logits.
"""

import copy
import importlib.util
import os.path as osp

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import Config

import mmseg_robust.models.decode_heads  # noqa: F401  (registers the heads)
from mmseg_robust.models.checkpoint import CheckpointError, expected_shapes
from mmseg_robust.models.converters import (
    convert_semseg_state_dict,
    detect_semseg_layout,
)
from mmseg_robust.registry import MODELS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


pytestmark = pytest.mark.usefixtures('one_thread_mmseg_scope')


# ---------------------------------------------------------------- reference layout
def _conv_bn(cin, cout, k, **kw):
    return [nn.Conv2d(cin, cout, k, bias=False, **kw), nn.BatchNorm2d(cout)]


class RefBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(out + res)


def _classifier(cin, mid, k, num_out):
    # Sequential(conv, BN, ReLU, Dropout2d, conv1x1): keys .0, .1, .4
    return nn.Sequential(
        *_conv_bn(cin, mid, k, padding=k // 2),
        nn.ReLU(),
        nn.Dropout2d(0.1),
        nn.Conv2d(mid, num_out, 1),
    )


class RefNet(nn.Module):
    """semseg PSPNet / DeepLabv3 (+ DDC-AT branches) on ResNet-50, width ``w``."""

    def __init__(self, arch='pspnet', ddcat=False, w=64, classes=21):
        super().__init__()
        self.arch, self.ddcat = arch, ddcat
        self.layer0 = nn.Sequential(
            *_conv_bn(3, w, 3, stride=2, padding=1),
            nn.ReLU(),
            *_conv_bn(w, w, 3, padding=1),
            nn.ReLU(),
            *_conv_bn(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        self.inplanes = 2 * w
        self.layer1 = self._layer(w, 3, 1, 1)
        self.layer2 = self._layer(2 * w, 4, 2, 1)
        self.layer3 = self._layer(4 * w, 6, 1, 2)  # stride 1, dilation 2
        self.layer4 = self._layer(8 * w, 3, 1, 4)  # stride 1, dilation 4
        fea = 32 * w
        if arch == 'pspnet':
            self.ppm = nn.Module()
            self.ppm.features = nn.ModuleList(
                nn.Sequential(
                    nn.AdaptiveAvgPool2d(b), *_conv_bn(fea, fea // 4, 1), nn.ReLU()
                )
                for b in (1, 2, 3, 6)
            )
            cat, mid, k, aux_mid, aux_k = 2 * fea, 8 * w, 3, 4 * w, 3
        else:
            out = 4 * w
            convs = [nn.Sequential(*_conv_bn(fea, out, 1), nn.ReLU())]
            convs += [
                nn.Sequential(*_conv_bn(fea, out, 3, padding=r, dilation=r), nn.ReLU())
                for r in (6, 12, 18)
            ]
            convs.append(
                nn.Sequential(
                    nn.AdaptiveAvgPool2d(1), *_conv_bn(fea, out, 1), nn.ReLU()
                )
            )
            self.aspp = nn.Module()
            self.aspp.convs = nn.ModuleList(convs)
            cat, mid, k, aux_mid, aux_k = 5 * out, out, 1, out, 1
        if ddcat:
            self.cls1 = _classifier(cat, mid, k, classes)
            self.mask1 = _classifier(cat, mid, k, 2)
            self.cls2 = _classifier(cat, mid, k, classes)
            self.aux_cls1 = _classifier(16 * w, aux_mid, aux_k, classes)
        else:
            self.cls = _classifier(cat, mid, k, classes)
            self.aux = _classifier(16 * w, aux_mid, aux_k, classes)

    def _layer(self, planes, blocks, stride, dilation):
        down = None
        if stride != 1 or self.inplanes != planes * 4:
            down = nn.Sequential(*_conv_bn(self.inplanes, planes * 4, 1, stride=stride))
        layers = [RefBottleneck(self.inplanes, planes, stride, dilation, down)]
        self.inplanes = planes * 4
        layers += [
            RefBottleneck(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.layer2(self.layer1(self.layer0(x)))
        x3 = self.layer3(x)
        x4 = self.layer4(x3)
        size = x4.shape[2:]
        if self.arch == 'pspnet':
            outs = [x4] + [
                F.interpolate(f(x4), size, mode='bilinear', align_corners=True)
                for f in self.ppm.features
            ]
        else:
            c = self.aspp.convs
            outs = [m(x4) for m in c[:-1]] + [
                F.interpolate(c[-1](x4), size, mode='bilinear', align_corners=True)
            ]
        return x3, torch.cat(outs, 1)

    def forward(self, x):
        """Eval outputs at input size: main (cls/cls1), routed, aux."""
        x3, feats = self.features(x)

        def up(t):
            return F.interpolate(t, x.shape[2:], mode='bilinear', align_corners=True)

        if not self.ddcat:
            return up(self.cls(feats)), None, up(self.aux(x3))
        cls1, cls2, mask1 = (up(m(feats)) for m in (self.cls1, self.cls2, self.mask1))
        m = mask1.argmax(1, keepdim=True).float()
        return cls1, m * cls2 + (1 - m) * cls1, up(self.aux_cls1(x3))


def reference_checkpoint(arch, ddcat, w=64, classes=21, meta=False):
    """A checkpoint as the reference saves it: module. prefix, epoch, optimizer."""
    if meta:
        with torch.device('meta'):
            net = RefNet(arch, ddcat, w, classes)
        sd = {
            k: torch.zeros(v.shape, dtype=v.dtype) for k, v in net.state_dict().items()
        }
    else:
        torch.manual_seed(0)
        net = RefNet(arch, ddcat, w, classes)
        with torch.no_grad():
            for mod in net.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0, 0.1)
                    mod.running_mean.normal_(0, 0.1)
                    mod.running_var.uniform_(0.5, 1.5)
                    mod.num_batches_tracked.fill_(7)
        sd = net.state_dict()
    ckpt = dict(
        epoch=50,
        state_dict={'module.' + k: v for k, v in sd.items()},
        optimizer=dict(state={}, param_groups=[dict(lr=0.0, params=[0])]),
    )
    return ckpt, net


# ------------------------------------------------------------------ mmseg targets
CONFIGS = {
    ('pspnet', False): 'sat/pspnet_r50-d8_sat_voc12aug-473x473.py',
    ('pspnet', True): 'ddcat/pspnet_r50-d8_ddcat_voc12aug-473x473.py',
    ('deeplabv3', False): 'sat/deeplabv3_r50-d8_sat_cityscapes-449x449.py',
    ('deeplabv3', True): 'ddcat/deeplabv3_r50-d8_ddcat_cityscapes-449x449.py',
}


def model_cfg(arch, ddcat, w=64, classes=None):
    cfg = Config.fromfile(osp.join(REPO, 'configs', CONFIGS[(arch, ddcat)])).model
    cfg = copy.deepcopy(cfg.to_dict())
    cfg['backbone']['init_cfg'] = None
    if classes is not None:
        cfg['decode_head']['num_classes'] = classes
        cfg['auxiliary_head']['num_classes'] = classes
    if w != 64:  # narrow copy of the same architecture
        norm = dict(type='BN', requires_grad=True)
        cfg['backbone'].update(stem_channels=2 * w, base_channels=w, norm_cfg=norm)
        head, aux = cfg['decode_head'], cfg['auxiliary_head']
        head.update(
            in_channels=32 * w,
            norm_cfg=norm,
            channels=8 * w if arch == 'pspnet' else 4 * w,
        )
        aux.update(in_channels=16 * w, channels=4 * w, norm_cfg=norm)
    return cfg


@pytest.mark.parametrize('arch,ddcat', list(CONFIGS))
def test_full_size_reference_keys_fill_our_configs(arch, ddcat):
    classes = 19 if arch == 'deeplabv3' else 21
    ckpt, _ = reference_checkpoint(arch, ddcat, classes=classes, meta=True)
    layout = detect_semseg_layout({k[7:]: v for k, v in ckpt['state_dict'].items()})
    assert layout == (arch, 'ddcat' if ddcat else 'plain', classes, True)
    cfg = model_cfg(arch, ddcat)
    expected = expected_shapes(cfg)
    out = convert_semseg_state_dict(ckpt, expected=expected)
    assert list(out) == [k for k in out if k in expected]
    assert set(out) == set(expected)
    if arch == 'pspnet' and ddcat:  # one real strict load of a full-size model
        model = MODELS.build(cfg)
        model.load_state_dict(out, strict=True)


@pytest.mark.parametrize('arch,ddcat', list(CONFIGS))
def test_converted_model_reproduces_reference_logits(arch, ddcat):
    w, classes = 4, 5
    ckpt, net = reference_checkpoint(arch, ddcat, w=w, classes=classes)
    net = net.double().eval()
    cfg = model_cfg(arch, ddcat, w=w, classes=classes)
    model = MODELS.build(cfg).double().eval()
    out = convert_semseg_state_dict(ckpt, expected=expected_shapes(cfg))
    model.load_state_dict(out, strict=True)
    x = torch.randn(2, 3, 41, 41, dtype=torch.float64)
    metas = [dict(img_shape=(41, 41), pad_shape=(41, 41))] * 2
    with torch.no_grad():
        main, routed, aux = net(x)
        ours = model.encode_decode(x, metas)
        feats = model.extract_feat(x)
        ours_aux = F.interpolate(
            model.auxiliary_head(feats), (41, 41), mode='bilinear', align_corners=True
        )
        assert torch.allclose(ours, main, rtol=1e-9, atol=1e-9)
        assert torch.allclose(ours_aux, aux, rtol=1e-9, atol=1e-9)
        if ddcat:
            ours_routed = model.decode_head.routed_logits(feats, size=(41, 41))
            assert torch.allclose(ours_routed, routed, rtol=1e-9, atol=1e-9)


def _convert_errors(ckpt, expected=None, **kw):
    with pytest.raises(CheckpointError) as err:
        convert_semseg_state_dict(ckpt, expected=expected, **kw)
    return str(err.value)


def test_unmapped_missing_and_wrong_shape_tensors_are_named():
    ckpt, _ = reference_checkpoint('deeplabv3', True, w=4, classes=5)
    expected = expected_shapes(model_cfg('deeplabv3', True, w=4, classes=5))
    sd = ckpt['state_dict']
    convert_semseg_state_dict(ckpt, expected=expected)  # the intact file works

    bad = dict(sd)
    bad['module.extra.weight'] = torch.zeros(3)
    bad['module.layer0.2.weight'] = torch.zeros(3)  # a ReLU has no weights
    msg = _convert_errors(bad, expected)
    assert 'extra.weight' in msg and 'layer0.2.weight' in msg

    bad = dict(sd)
    del bad['module.cls2.4.bias'], bad['module.layer3.2.bn2.running_var']
    msg = _convert_errors(bad, expected)
    assert 'decode_head.cls2.bias' in msg
    assert 'backbone.layer3.2.bn2.running_var' in msg

    bad = dict(sd)
    bad['module.aspp.convs.2.0.weight'] = torch.zeros(16, 128, 1, 1)
    msg = _convert_errors(bad, expected)
    assert 'decode_head.aspp_modules.2.conv.weight (from aspp.convs.2.0.weight)' in msg
    assert '(16, 128, 1, 1)' in msg and '(16, 128, 3, 3)' in msg

    # a DDC-AT file against the plain model: its extra branches are named
    plain = expected_shapes(model_cfg('deeplabv3', False, w=4, classes=5))
    msg = _convert_errors(ckpt, plain)
    assert 'decode_head.cls2.weight' in msg and 'decode_head.mask1.bias' in msg
    # ... unless dropped on purpose
    out = convert_semseg_state_dict(ckpt, expected=plain, drop=('cls2.', 'mask1.'))
    assert set(out) == set(plain)


def test_layout_errors():
    with pytest.raises(CheckpointError, match='layer0'):
        detect_semseg_layout({'backbone.conv1.weight': torch.zeros(1)})
    ckpt, _ = reference_checkpoint('pspnet', False, w=4, classes=5)
    sd = {k[7:]: v for k, v in ckpt['state_dict'].items() if 'cls.' not in k}
    with pytest.raises(CheckpointError, match='classifier'):
        detect_semseg_layout(sd)


def test_imagenet_backbone_and_missing_num_batches_tracked():
    ckpt, net = reference_checkpoint('pspnet', False, w=4, classes=5)
    names = {
        '0': 'conv1',
        '1': 'bn1',
        '3': 'conv2',
        '4': 'bn2',
        '6': 'conv3',
        '7': 'bn3',
    }
    sd = {}
    for k, v in net.state_dict().items():
        if k.startswith('layer0.'):
            _, i, p = k.split('.')
            sd[f'{names[i]}.{p}'] = v
        elif k.startswith(('layer1', 'layer2', 'layer3', 'layer4')):
            if not k.endswith('num_batches_tracked'):  # an old torch's BN
                sd[k] = v
    sd['fc.weight'], sd['fc.bias'] = torch.zeros(1000, 256), torch.zeros(1000)
    cfg = model_cfg('pspnet', False, w=4, classes=5)
    expected = expected_shapes(cfg, prefix='backbone.')
    out = convert_semseg_state_dict(sd, expected=expected)
    assert set(out) == set(expected) and not any(k.startswith('fc') for k in out)
    assert int(out['layer1.0.bn1.num_batches_tracked']) == 0
    backbone = MODELS.build(cfg['backbone'])
    backbone.load_state_dict(out, strict=True)


def _tool():
    path = osp.join(REPO, 'tools', 'model_converters', 'ddcat_semseg.py')
    spec = importlib.util.spec_from_file_location('ddcat_semseg_tool', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_writes_a_safe_checkpoint_for_a_config(tmp_path, capsys):
    ckpt, _ = reference_checkpoint('pspnet', True, w=4, classes=5)
    src, dst = tmp_path / 'train_epoch_50.pth', tmp_path / 'ddcat_mmseg.pth'
    torch.save(ckpt, src)
    cfg = Config(dict(model=model_cfg('pspnet', True, w=4, classes=5)))
    cfg_path = tmp_path / 'narrow_ddcat.py'
    cfg.dump(str(cfg_path))
    tool = _tool()
    assert tool.main([str(src), str(dst), '--config', str(cfg_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f'wrote checkpoint: {dst}'
    written = torch.load(dst, map_location='cpu', weights_only=True)
    model = MODELS.build(cfg.model)
    model.load_state_dict(written['state_dict'], strict=True)
    assert written['meta']['layout']['scheme'] == 'ddcat'
    # the provenance in the vocabulary every converter writes
    from mmseg_robust.models.checkpoint import CONVERSION_META_KEYS

    assert tuple(written['meta'])[:4] == CONVERSION_META_KEYS
    assert written['meta']['converter'] == 'ddcat_semseg'
    assert written['meta']['source'] == src.name
    assert written['meta']['config'] == str(cfg_path)
    assert written['meta']['dropped'] == []
    # --plain against the plain config; --plain on a SAT file is refused
    plain_cfg = Config(dict(model=model_cfg('pspnet', False, w=4, classes=5)))
    plain_path = tmp_path / 'narrow_plain.py'
    plain_cfg.dump(str(plain_path))
    tool.main([str(src), str(dst), '--config', str(plain_path), '--plain'])
    written = torch.load(dst, map_location='cpu', weights_only=True)
    MODELS.build(plain_cfg.model).load_state_dict(written['state_dict'], strict=True)
    # default configs are found from the layout and the class count
    assert tool.default_config('deeplabv3', 'ddcat', 19).endswith(
        osp.join('ddcat', 'deeplabv3_r50-d8_ddcat_cityscapes-449x449.py')
    )
    with pytest.raises(CheckpointError, match='--config'):
        tool.default_config('pspnet', 'plain', 5)
