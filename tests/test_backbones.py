"""ConvNeXt-CvSt and the strict ViT (docs/algorithms.md section 6): architecture,
feature strides, parameter counts, the stem against a reference written from the
spec, and strict ``Pretrained`` loading."""

import pytest
import torch
import torch.nn.functional as F

import mmseg_robust  # noqa: F401
import mmseg_robust.models.backbones  # noqa: F401  (until models/__init__ imports it)
from mmseg_robust.models.backbones import ConvNeXtCvSt, VisionTransformerStrict
from mmseg_robust.models.checkpoint import CheckpointError
from mmseg_robust.registry import MODELS

# Parameter counts with four output norms (norm0..norm3), measured and checked
# below against an independent count; recorded in docs/model_zoo.md.
PARAMS = {'tiny': 27_859_776, 'small': 49_494_336}


pytestmark = pytest.mark.usefixtures('one_thread')


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _ln_channels_first(x, weight, bias, eps=1e-6):
    # The reference's channels-first LayerNorm, written out (docs/algorithms.md 6).
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    return weight[:, None, None] * x + bias[:, None, None]


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return ConvNeXtCvSt(arch='tiny').eval()


def test_registered_in_mmseg_models():
    assert MODELS.get('ConvNeXtCvSt') is ConvNeXtCvSt
    assert MODELS.get('VisionTransformerStrict') is VisionTransformerStrict


def test_tiny_features_at_strides_4_8_16_32(tiny):
    with torch.no_grad():
        outs = tiny(torch.rand(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [
        (2, 96, 16, 16),
        (2, 192, 8, 8),
        (2, 384, 4, 4),
        (2, 768, 2, 2),
    ]
    # Odd sizes (VOC's 473 crop) round up like the reference's padded convs.
    with torch.no_grad():
        outs = tiny(torch.rand(1, 3, 75, 75))
    assert [o.shape[-1] for o in outs] == [19, 9, 4, 2]


def test_only_the_stem_differs_from_mmpretrain_convnext(tiny):
    from mmpretrain.models.backbones import ConvNeXt

    ref = ConvNeXt(arch='tiny', out_indices=[0, 1, 2, 3], gap_before_final_norm=False)
    ours = {k: v.shape for k, v in tiny.state_dict().items()}
    theirs = {k: v.shape for k, v in ref.state_dict().items()}
    differ = {k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
    assert differ == {
        'downsample_layers.0.0.weight',
        'downsample_layers.0.0.bias',
        'downsample_layers.0.1.weight',
        'downsample_layers.0.1.bias',
        'downsample_layers.0.3.weight',
        'downsample_layers.0.3.bias',
        'downsample_layers.0.4.weight',
        'downsample_layers.0.4.bias',
    }
    stem = tiny.downsample_layers[0]
    convs = [stem[0], stem[3]]
    assert [
        (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding)
        for c in convs
    ] == [(3, 48, (3, 3), (2, 2), (1, 1)), (48, 96, (3, 3), (2, 2), (1, 1))]
    assert [stem[i].eps for i in (1, 4)] == [1e-6, 1e-6]
    assert all(isinstance(stem[i], torch.nn.GELU) for i in (2, 5))


def test_stem_matches_reference_math(tiny):
    stem = tiny.downsample_layers[0]
    x = torch.rand(2, 3, 33, 31)
    p = dict(stem.named_parameters())
    with torch.no_grad():
        for name in ('1.weight', '4.weight', '1.bias', '4.bias'):
            p[name].normal_()  # non-trivial LN affine
        ref = F.conv2d(x, p['0.weight'], p['0.bias'], stride=2, padding=1)
        ref = F.gelu(_ln_channels_first(ref, p['1.weight'], p['1.bias']))
        ref = F.conv2d(ref, p['3.weight'], p['3.bias'], stride=2, padding=1)
        ref = F.gelu(_ln_channels_first(ref, p['4.weight'], p['4.bias']))
        torch.testing.assert_close(stem(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('arch', ['tiny', 'small'])
def test_parameter_counts(arch, tiny):
    from mmpretrain.models.backbones import ConvNeXt

    model = tiny if arch == 'tiny' else ConvNeXtCvSt(arch=arch)
    # Independent count: mmpretrain's ConvNeXt with four output norms, minus the
    # patchify stem (4x4 conv 3->96 + LN), plus the conv stem (two 3x3 convs
    # 3->48->96, two LNs).
    patchify = (3 * 96 * 4 * 4 + 96) + 2 * 96
    conv_stem = (3 * 48 * 9 + 48) + 2 * 48 + (48 * 96 * 9 + 96) + 2 * 96
    ref = ConvNeXt(arch=arch, out_indices=[0, 1, 2, 3], gap_before_final_norm=False)
    assert _count(model) == _count(ref) - patchify + conv_stem == PARAMS[arch]


def test_frozen_stages_freeze_the_conv_stem():
    model = ConvNeXtCvSt(
        arch=dict(depths=[1, 1, 1, 1], channels=[16, 32, 64, 128]), frozen_stages=1
    )
    assert not any(p.requires_grad for p in model.downsample_layers[0].parameters())
    assert all(p.requires_grad for p in model.stages[1].parameters())


def _small_convnext(**kwargs):
    return ConvNeXtCvSt(
        arch=dict(depths=[1, 1, 2, 1], channels=[16, 32, 64, 128]), **kwargs
    )


def test_pretrained_init_loads_strictly(tmp_path):
    torch.manual_seed(1)
    src = _small_convnext()
    path = tmp_path / 'backbone.pth'
    torch.save({'state_dict': src.state_dict(), 'meta': {}}, path)
    model = _small_convnext(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
    # The backbone of a full segmentor checkpoint, by prefix.
    full = {f'backbone.{k}': v for k, v in src.state_dict().items()}
    full['decode_head.conv_seg.weight'] = torch.zeros(2, 2)
    torch.save({'state_dict': full}, tmp_path / 'full.pth')
    model = _small_convnext(
        init_cfg=dict(
            type='Pretrained', checkpoint=str(tmp_path / 'full.pth'), prefix='backbone.'
        )
    )
    model.init_weights()
    torch.testing.assert_close(model.stages[2][1].gamma, src.stages[2][1].gamma)


@pytest.mark.parametrize(
    'change, match',
    [
        ('missing', 'stages.2.1.gamma'),
        ('unexpected', 'head.fc.weight'),
        ('shape', 'norm3.weight'),
        ('timm_names', 'stem.stem.0.weight'),
    ],
)
def test_pretrained_init_refuses_a_file_that_does_not_fit(tmp_path, change, match):
    state = _small_convnext().state_dict()
    if change == 'missing':
        del state['stages.2.1.gamma']
    elif change == 'unexpected':
        state['head.fc.weight'] = torch.zeros(10, 128)
    elif change == 'shape':
        state['norm3.weight'] = torch.ones(64)
    else:  # an unconverted revisiting-at file: nothing would load
        state = {'stem.stem.0.weight': torch.zeros(8, 3, 3, 3)}
    path = tmp_path / 'bad.pth'
    torch.save(state, path)
    model = _small_convnext(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        model.init_weights()
    for k, v in model.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k])


def _vit(**kwargs):
    cfg = dict(
        img_size=(64, 64),
        patch_size=16,
        embed_dims=48,
        num_layers=2,
        num_heads=3,
        final_norm=True,
        with_cls_token=True,
        interpolate_mode='bilinear',
    )
    cfg.update(kwargs)
    return VisionTransformerStrict(**cfg)


def test_vit_strict_resizes_pos_embed_and_loads(tmp_path):
    torch.manual_seed(2)
    src = _vit(img_size=(224, 224))
    torch.save(src.state_dict(), tmp_path / 'vit.pth')
    model = _vit(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'vit.pth')))
    model.init_weights()
    assert model.pos_embed.shape == (1, 17, 48)
    grid = src.pos_embed[:, 1:].reshape(1, 14, 14, 48).permute(0, 3, 1, 2)
    expected = (
        F.interpolate(grid, size=(4, 4), mode='bilinear', align_corners=False)
        .flatten(2)
        .transpose(1, 2)
    )
    torch.testing.assert_close(model.pos_embed[:, 1:], expected)
    torch.testing.assert_close(model.layers[1].ln2.weight, src.layers[1].ln2.weight)


def test_vit_strict_refuses_timm_names(tmp_path):
    state = _vit().state_dict()
    state['blocks.0.attn.qkv.weight'] = state.pop('layers.0.attn.attn.in_proj_weight')
    torch.save(state, tmp_path / 'timm.pth')
    model = _vit(
        init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'timm.pth'))
    )
    with pytest.raises(CheckpointError, match='blocks.0.attn.qkv.weight'):
        model.init_weights()


def test_vit_conv_stem_stride_16():
    model = _vit(stem='conv', embed_dims=384, num_heads=6, out_indices=-1)
    with torch.no_grad():
        (out,) = model(torch.rand(1, 3, 64, 80))
    assert out.shape == (1, 384, 4, 5)
    names = {
        k.split('.')[2]
        for k in model.state_dict()
        if k.startswith('patch_embed.projection.')
    }
    assert names == {'0', '1', '3', '4', '6', '7', '9', '10', '12'}
    with pytest.raises(ValueError, match='patch_size=16'):
        _vit(stem='conv', patch_size=8)
