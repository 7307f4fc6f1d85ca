"""Checkpoint converters (docs/algorithms.md section 7).

Each test builds a *reference* model written here from the spec and the reference
code's naming (revisiting-at's timm ConvNeXt-CvSt / ViT, Robust-Segmentation's
UperNet and Segmenter), so its state dict has exactly the released files' tensor
names and shapes. The converted weights must load strictly into our mmseg model,
which must then compute the same outputs; unknown, missing and wrongly shaped
tensors must raise errors naming them.
"""

import argparse
import collections
import os.path as osp
import runpy
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import Config, ConfigDict
from mmengine.registry import init_default_scope

import mmseg_robust  # noqa: F401
import mmseg_robust.models.backbones  # noqa: F401  (until models/__init__ imports it)
from mmseg_robust.models.backbones import ConvNeXtCvSt, VisionTransformerStrict
from mmseg_robust.models.checkpoint import (
    CONVERSION_META_KEYS,
    CheckpointError,
    save_checkpoint,
)
from mmseg_robust.models.converters import (
    build_target_model,
    convert_revisiting_at_convnext,
    convert_revisiting_at_vit,
    convert_robust_segmentation_segmenter,
    convert_robust_segmentation_upernet,
)
from mmseg_robust.registry import MODELS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONVERTERS = osp.join(REPO, 'tools', 'model_converters')
UPERNET_CFG = osp.join(
    REPO,
    'configs',
    'pirat',
    'upernet_convnext-t-cvst_pirat_8xb32-50e_voc12aug-473x473.py',
)
SEGMENTER_CFG = osp.join(
    REPO, 'configs', 'pirat', 'segmenter_vit-s_pirat_8xb14-32e_ade20k151-512x512.py'
)
TINY = dict(depths=[3, 3, 9, 3], dims=[96, 192, 384, 768])
SHALLOW = dict(depths=[1, 1, 1, 1], dims=[96, 192, 384, 768])


pytestmark = pytest.mark.usefixtures('one_thread')


# ----------------------------------------------------------------------------
# Reference models (docs/algorithms.md sections 6 and 7), written from the spec.
# ----------------------------------------------------------------------------
class LayerNormCF(nn.Module):
    """Channels-first LayerNorm written out, as the reference ConvNeXt code."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def conv_stem_ref(out_channels=96):
    mid = out_channels // 2
    return nn.Sequential(
        nn.Conv2d(3, mid, 3, stride=2, padding=1),
        LayerNormCF(mid),
        nn.GELU(),
        nn.Conv2d(mid, out_channels, 3, stride=2, padding=1),
        LayerNormCF(out_channels),
        nn.GELU(),
    )


class ConvNeXtBlockRef(nn.Module):
    """dwconv 7x7 -> LN (channels last) -> fc -> GELU -> fc -> gamma, residual;
    timm names (conv_dw, mlp.fc1/fc2) or the original repo's (dwconv, pwconv1/2)."""

    def __init__(self, dim, timm_names):
        super().__init__()
        self.timm_names = timm_names
        dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        fc1, fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        if timm_names:
            self.conv_dw = dw
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = fc1, fc2
        else:
            self.dwconv, self.pwconv1, self.pwconv2 = dw, fc1, fc2
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        if self.timm_names:
            dw, fc1, fc2 = self.conv_dw, self.mlp.fc1, self.mlp.fc2
        else:
            dw, fc1, fc2 = self.dwconv, self.pwconv1, self.pwconv2
        y = self.norm(dw(x).permute(0, 2, 3, 1))
        y = self.gamma * fc2(F.gelu(fc1(y)))
        return x + y.permute(0, 3, 1, 2)


class TimmConvNeXtCvStRef(nn.Module):
    """revisiting-at's classifier: timm ConvNeXt with ``stem.stem`` replaced."""

    def __init__(self, depths, dims, num_classes=1000):
        super().__init__()
        self.stem = nn.Module()
        self.stem.stem = conv_stem_ref(dims[0])
        self.stages = nn.ModuleList()
        for j, (depth, dim) in enumerate(zip(depths, dims)):
            stage = nn.Module()
            stage.downsample = (
                nn.Identity()
                if j == 0
                else nn.Sequential(
                    LayerNormCF(dims[j - 1]), nn.Conv2d(dims[j - 1], dim, 2, 2)
                )
            )
            stage.blocks = nn.Sequential(
                *[ConvNeXtBlockRef(dim, timm_names=True) for _ in range(depth)]
            )
            self.stages.append(stage)
        self.head = nn.Module()
        self.head.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head.fc = nn.Linear(dims[-1], num_classes)

    def stage_features(self, x):
        x = self.stem.stem(x)
        outs = []
        for stage in self.stages:
            x = stage.blocks(stage.downsample(x))
            outs.append(x)
        return outs


class ImageNormalizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer(
            'mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        )
        self.register_buffer(
            'std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        )


def normalized(model):
    """revisiting-at's wrapper: ``normalize.{mean,std}`` + ``model.*``."""
    return nn.Sequential(
        collections.OrderedDict(normalize=ImageNormalizer(), model=model)
    )


class AttentionRef(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = (
            self.qkv(x)
            .reshape(b, n, 3, self.heads, c // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ViTBlockRef(nn.Module):
    def __init__(self, dim, heads, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = AttentionRef(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class ViTRef(nn.Module):
    """timm / Segmenter ViT: patch embedding (or revisiting-at's conv stem at
    ``patch_embed.proj.stem``), class token, position embedding (resized
    bilinearly to the input grid), pre-norm blocks, final norm, ImageNet head."""

    def __init__(self, dim=384, depth=12, heads=6, grid=14, eps=1e-6, conv_stem=False):
        super().__init__()
        self.patch_embed = nn.Module()
        if conv_stem:
            self.patch_embed.proj = nn.Module()
            layers, c = [], 3
            for i in range(4):
                out = 48 * 2**i
                layers += [nn.Conv2d(c, out, 3, 2, 1), LayerNormCF(out), nn.GELU()]
                c = out
            self.patch_embed.proj.stem = nn.Sequential(*layers, nn.Conv2d(c, dim, 1))
        else:
            self.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, dim))
        self.blocks = nn.ModuleList(
            [ViTBlockRef(dim, heads, eps) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, 1000)

    def tokens(self, im):
        proj = self.patch_embed.proj
        x = proj.stem(im) if hasattr(proj, 'stem') else proj(im)
        h, w = x.shape[2:]
        x = torch.cat(
            [self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1
        )
        pos = self.pos_embed
        if pos.shape[1] != x.shape[1]:
            g = int((pos.shape[1] - 1) ** 0.5)
            grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode='bilinear')
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)
        x = x + pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), (h, w)


class ConvModuleRef(nn.Module):
    """Robust-Segmentation's UperNetConvModule: conv (no bias), batch_norm, ReLU."""

    def __init__(self, cin, cout, k, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.batch_norm = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU()

    def forward(self, x):
        return self.activation(self.batch_norm(self.conv(x)))


class UperHeadRef(nn.Module):
    def __init__(self, in_channels, channels, num_classes, scales=(1, 2, 3, 6)):
        super().__init__()
        self.psp_modules = nn.ModuleList(
            [
                nn.Sequential(
                    nn.AdaptiveAvgPool2d(s), ConvModuleRef(in_channels[-1], channels, 1)
                )
                for s in scales
            ]
        )
        self.bottleneck = ConvModuleRef(
            in_channels[-1] + len(scales) * channels, channels, 3, 1
        )
        self.lateral_convs = nn.ModuleList(
            [ConvModuleRef(c, channels, 1) for c in in_channels[:-1]]
        )
        self.fpn_convs = nn.ModuleList(
            [ConvModuleRef(channels, channels, 3, 1) for _ in in_channels[:-1]]
        )
        self.fpn_bottleneck = ConvModuleRef(len(in_channels) * channels, channels, 3, 1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats):

        def up(x, size):
            return F.interpolate(x, size=size, mode='bilinear', align_corners=False)

        top = feats[-1]
        psp = [top] + [up(m(top), top.shape[2:]) for m in self.psp_modules]
        laterals = [conv(feats[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.bottleneck(torch.cat(psp, 1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + up(
                laterals[i], laterals[i - 1].shape[2:]
            )
        outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)]
        outs.append(laterals[-1])
        outs = [outs[0]] + [up(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.classifier(self.fpn_bottleneck(torch.cat(outs, 1)))


class UperNetRef(nn.Module):
    """Robust-Segmentation's UperNetForSemanticSegmentation (ConvNeXt-CvSt)."""

    def __init__(self, depths, dims, num_classes):
        super().__init__()
        self.backbone = nn.Module()
        stem = nn.Module()
        stem.stem = conv_stem_ref(dims[0])
        self.backbone.downsample_layers = nn.ModuleList(
            [stem]
            + [
                nn.Sequential(
                    LayerNormCF(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], 2, 2)
                )
                for i in range(1, 4)
            ]
        )
        self.backbone.stages = nn.ModuleList(
            [
                nn.Sequential(
                    *[ConvNeXtBlockRef(d, timm_names=False) for _ in range(n)]
                )
                for n, d in zip(depths, dims)
            ]
        )
        for i, d in enumerate(dims):
            setattr(self.backbone, f'norm{i}', LayerNormCF(d))
        self.decode_head = UperHeadRef(dims, 512, num_classes)
        self.auxiliary_head = nn.Module()
        self.auxiliary_head.convs = nn.Sequential(ConvModuleRef(dims[2], 256, 3, 1))
        self.auxiliary_head.classifier = nn.Conv2d(256, num_classes, 1)

    def features(self, x):
        outs = []
        for i in range(4):
            layer = self.backbone.downsample_layers[i]
            x = layer.stem(x) if i == 0 else layer(x)
            x = self.backbone.stages[i](x)
            outs.append(getattr(self.backbone, f'norm{i}')(x))
        return outs

    def forward(self, x):
        feats = self.features(x)
        logits = F.interpolate(
            self.decode_head(feats),
            size=x.shape[2:],
            mode='bilinear',
            align_corners=False,
        )
        aux = self.auxiliary_head.classifier(self.auxiliary_head.convs(feats[2]))
        return logits, aux


class MaskTransformerRef(nn.Module):
    def __init__(self, n_cls, dim=384, layers=2, heads=6):
        super().__init__()
        self.n_cls = n_cls
        self.blocks = nn.ModuleList(
            [ViTBlockRef(dim, heads, 1e-5) for _ in range(layers)]
        )
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, dim))
        self.proj_dec = nn.Linear(dim, dim)
        self.proj_patch = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.proj_classes = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(n_cls)

    def forward(self, x, grid):
        x = self.proj_dec(x)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches = x[:, : -self.n_cls] @ self.proj_patch
        classes = x[:, -self.n_cls :] @ self.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))
        return masks.transpose(1, 2).reshape(x.shape[0], self.n_cls, *grid)


class SegmenterRef(nn.Module):
    """Strudel et al.'s Segmenter as used by Robust-Segmentation (LN eps 1e-5)."""

    def __init__(self, n_cls, grid=32):
        super().__init__()
        self.encoder = ViTRef(grid=grid, eps=1e-5)
        self.decoder = MaskTransformerRef(n_cls)

    def forward(self, im):
        tokens, grid = self.encoder.tokens(im)
        masks = self.decoder(tokens[:, 1:], grid)
        return F.interpolate(masks, size=im.shape[2:], mode='bilinear')


def randomize(model, seed=0):
    """Non-trivial values everywhere (norm affines, BN statistics)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith('running_var'):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif name.endswith(
                    ('norm.weight', 'norm1.weight', 'norm2.weight', 'batch_norm.weight')
                ):
                    t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
                else:
                    t.copy_(0.05 * torch.randn(t.shape, generator=g))
    return model.eval()


def prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def assert_raises_naming(fn, name):
    with pytest.raises(CheckpointError) as info:
        fn()
    assert name in str(info.value), str(info.value)


def write_and_reload(tmp_path, state, meta, name='out.pth'):
    path = str(tmp_path / name)
    save_checkpoint(path, state, meta)
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    assert set(ckpt) == {'state_dict', 'meta'}
    return path, ckpt


# ----------------------------------------------------------------------------
# revisiting-at ConvNeXt-CvSt -> ConvNeXtCvSt
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def timm_convnext_tiny():
    torch.manual_seed(0)
    return randomize(TimmConvNeXtCvStRef(**TINY))


@pytest.mark.parametrize('wrapping', ['module', 'base_model+normalize'])
def test_revisiting_at_convnext_reproduces_the_classifier_features(
    tmp_path, timm_convnext_tiny, wrapping
):
    ref = timm_convnext_tiny
    if wrapping == 'module':
        src = prefixed(ref.state_dict(), 'module.')
    else:
        src = prefixed(normalized(ref).state_dict(), 'module.base_model.')
        assert 'module.base_model.normalize.mean' in src
    # The ImageNet normaliser is dropped only when asked to (see
    # test_revisiting_at_normalizer_*).
    state, meta = convert_revisiting_at_convnext(
        src, drop_normalizer=wrapping != 'module'
    )
    assert meta['arch'] == 'tiny'
    assert 'head.fc.weight' in str(meta['dropped'])
    assert meta['fresh'] == [
        f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias')
    ]
    path, _ = write_and_reload(tmp_path, state, meta)
    model = ConvNeXtCvSt(arch='tiny', init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()  # strict
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
        theirs = ref.stage_features(x)
    for o, t in zip(ours, theirs):
        # The output norms are fresh identity LayerNorms (channels first).
        t = F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2], eps=1e-6)
        torch.testing.assert_close(o, t.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)


def test_revisiting_at_convnext_errors_name_the_tensor(timm_convnext_tiny):
    src = prefixed(timm_convnext_tiny.state_dict(), 'module.')

    extra = dict(src, **{'module.stages.0.blocks.0.extra': torch.zeros(3)})
    assert_raises_naming(
        lambda: convert_revisiting_at_convnext(extra), 'stages.0.blocks.0.extra'
    )
    missing = dict(src)
    del missing['module.stages.2.blocks.4.mlp.fc2.bias']
    assert_raises_naming(
        lambda: convert_revisiting_at_convnext(missing),
        'stages.2.4.pointwise_conv2.bias',
    )
    wrong = dict(src)
    wrong['module.stages.1.downsample.1.weight'] = torch.zeros(192, 96, 4, 4)
    assert_raises_naming(
        lambda: convert_revisiting_at_convnext(wrong), 'downsample_layers.1.1.weight'
    )
    assert_raises_naming(
        lambda: convert_revisiting_at_convnext(src, arch='small'), 'tiny'
    )


def test_pirat_config_initialises_its_backbone_from_the_converted_file(
    tmp_path, upernet_cfg
):
    # The Runner's path: model.init_weights() on the whole segmentor loads the
    # backbone (strictly) from the config's init_cfg and initialises the heads.
    torch.manual_seed(6)
    ref = TimmConvNeXtCvStRef(**SHALLOW)
    state, meta = convert_revisiting_at_convnext(prefixed(ref.state_dict(), 'module.'))
    path, _ = write_and_reload(tmp_path, state, meta)
    cfg = dict(upernet_cfg)
    cfg['backbone'] = dict(
        cfg['backbone'],
        arch=dict(depths=SHALLOW['depths'], channels=SHALLOW['dims']),
        init_cfg=dict(type='Pretrained', checkpoint=path),
    )
    init_default_scope('mmseg')
    model = MODELS.build(ConfigDict(cfg))
    model.init_weights()
    for name, tensor in state.items():
        torch.testing.assert_close(model.backbone.state_dict()[name], tensor)


# ----------------------------------------------------------------------------
# revisiting-at / timm ViT -> mmseg VisionTransformer
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('conv_stem', [False, True])
def test_revisiting_at_vit_reproduces_the_encoder(tmp_path, conv_stem):
    torch.manual_seed(1)
    ref = randomize(ViTRef(depth=2, conv_stem=conv_stem))
    src = prefixed(normalized(ref).state_dict(), 'module.')
    state, meta = convert_revisiting_at_vit(src, drop_normalizer=True)
    assert meta['stem'] == ('conv' if conv_stem else 'patch')
    assert set(meta['dropped']) == {
        'head.weight',
        'head.bias',
        'normalize.mean',
        'normalize.std',
    }
    path, _ = write_and_reload(tmp_path, state, meta)
    # A 64 px model: the 14x14 position grid is resized (bilinearly) at load.
    model = VisionTransformerStrict(
        stem='conv' if conv_stem else 'patch',
        img_size=(64, 64),
        embed_dims=384,
        num_layers=2,
        num_heads=6,
        final_norm=True,
        norm_cfg=dict(type='LN', eps=1e-6),
        interpolate_mode='bilinear',
        out_indices=-1,
        init_cfg=dict(type='Pretrained', checkpoint=path),
    )
    model.init_weights()
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        (ours,) = model(x)
        tokens, (h, w) = ref.tokens(x)
    theirs = tokens[:, 1:].transpose(1, 2).reshape(2, 384, h, w)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_revisiting_at_vit_errors_name_the_tensor():
    src = prefixed(ViTRef(depth=2).state_dict(), 'model.')
    assert_raises_naming(
        lambda: convert_revisiting_at_vit(
            dict(src, **{'model.dist_token': torch.zeros(1, 1, 384)})
        ),
        'dist_token',
    )
    missing = dict(src)
    del missing['model.blocks.1.attn.proj.bias']
    assert_raises_naming(
        lambda: convert_revisiting_at_vit(missing), 'layers.1.attn.attn.out_proj.bias'
    )
    wrong = dict(src, **{'model.blocks.0.mlp.fc1.weight': torch.zeros(1000, 384)})
    assert_raises_naming(
        lambda: convert_revisiting_at_vit(wrong), 'layers.0.ffn.layers.0.0.weight'
    )


# ----------------------------------------------------------------------------
# Robust-Segmentation UperNet-ConvNeXt-CvSt -> mmseg EncoderDecoder
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def upernet_cfg():
    return Config.fromfile(UPERNET_CFG).model.to_dict()


@pytest.fixture(scope='module')
def upernet_tiny_ref():
    torch.manual_seed(2)
    return randomize(UperNetRef(TINY['depths'], TINY['dims'], 21))


def test_robust_segmentation_upernet_reproduces_the_model(
    tmp_path, upernet_cfg, upernet_tiny_ref
):
    ref = upernet_tiny_ref
    state, meta = convert_robust_segmentation_upernet(ref.state_dict(), upernet_cfg)
    assert (meta['arch'], meta['num_classes'], meta['dropped']) == ('tiny', 21, [])
    _, ckpt = write_and_reload(tmp_path, state, meta)
    model = build_target_model(upernet_cfg)
    model.load_state_dict(ckpt['state_dict'], strict=True)
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits, aux = ref(x)
        ours = model.encode_decode(x, [dict(img_shape=(64, 64))] * 2)
        ours_aux = model.auxiliary_head(model.extract_feat(x))
    torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_aux, aux, rtol=1e-4, atol=1e-4)


def test_robust_segmentation_upernet_reads_arch_and_classes(upernet_cfg):
    torch.manual_seed(3)
    ref = UperNetRef(SHALLOW['depths'], SHALLOW['dims'], 151)
    state, meta = convert_robust_segmentation_upernet(
        prefixed(ref.state_dict(), 'module.'), upernet_cfg
    )
    assert meta['num_classes'] == 151
    assert meta['arch'] == str(dict(depths=[1, 1, 1, 1], channels=[96, 192, 384, 768]))
    assert state['auxiliary_head.conv_seg.weight'].shape == (151, 256, 1, 1)
    assert 'decode_head.psp_modules.3.1.bn.num_batches_tracked' in state


def test_robust_segmentation_upernet_errors_name_the_tensor(upernet_cfg):
    src = UperNetRef(SHALLOW['depths'], SHALLOW['dims'], 21).state_dict()
    extra = dict(src, **{'decode_head.conv_seg.weight': torch.zeros(21, 512, 1, 1)})
    assert_raises_naming(
        lambda: convert_robust_segmentation_upernet(extra, upernet_cfg),
        'decode_head.conv_seg.weight',
    )
    missing = dict(src)
    del missing['decode_head.fpn_convs.1.batch_norm.running_var']
    assert_raises_naming(
        lambda: convert_robust_segmentation_upernet(missing, upernet_cfg),
        'decode_head.fpn_convs.1.bn.running_var',
    )
    wrong = dict(
        src, **{'auxiliary_head.classifier.weight': torch.zeros(21, 384, 1, 1)}
    )
    assert_raises_naming(
        lambda: convert_robust_segmentation_upernet(wrong, upernet_cfg),
        'auxiliary_head.conv_seg.weight',
    )


# ----------------------------------------------------------------------------
# Robust-Segmentation Segmenter ViT-S -> mmseg EncoderDecoder
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def segmenter_cfg():
    return Config.fromfile(SEGMENTER_CFG).model.to_dict()


def test_robust_segmentation_segmenter_reproduces_the_model(tmp_path, segmenter_cfg):
    torch.manual_seed(4)
    ref = randomize(SegmenterRef(n_cls=151))
    state, meta = convert_robust_segmentation_segmenter(ref.state_dict(), segmenter_cfg)
    assert meta['num_classes'] == 151 and meta['pos_embed_grid'] == 32
    assert meta['dropped'] == ['encoder.head.bias', 'encoder.head.weight']
    _, ckpt = write_and_reload(tmp_path, state, meta)
    model = build_target_model(segmenter_cfg)
    model.load_state_dict(ckpt['state_dict'], strict=True)
    model.eval()
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        theirs = ref(x)
        ours = model.encode_decode(x, [dict(img_shape=(64, 48))] * 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_robust_segmentation_segmenter_errors_name_the_tensor(segmenter_cfg):
    src = SegmenterRef(n_cls=151).state_dict()
    extra = dict(src, **{'decoder.head.weight': torch.zeros(151, 384)})
    assert_raises_naming(
        lambda: convert_robust_segmentation_segmenter(extra, segmenter_cfg),
        'decoder.head.weight',
    )
    missing = dict(src)
    del missing['decoder.blocks.1.norm2.weight']
    assert_raises_naming(
        lambda: convert_robust_segmentation_segmenter(missing, segmenter_cfg),
        'decode_head.layers.1.ln2.weight',
    )
    # A 224 px encoder (14x14 position grid) does not fit the 512 px config.
    wrong = dict(src, **{'encoder.pos_embed': torch.zeros(1, 197, 384)})
    assert_raises_naming(
        lambda: convert_robust_segmentation_segmenter(wrong, segmenter_cfg),
        'backbone.pos_embed',
    )


# ----------------------------------------------------------------------------
# Against timm itself, where it is installed (not a project dependency)
# ----------------------------------------------------------------------------
def test_references_have_timm_layout_and_converted_weights_match_timm():
    timm = pytest.importorskip('timm')
    convnext = timm.create_model('convnext_tiny', pretrained=False)
    holder = nn.Module()
    holder.stem = conv_stem_ref(96)
    convnext.stem = holder  # revisiting-at's CvSt
    layout = {k: v.shape for k, v in convnext.state_dict().items()}
    assert layout == {
        k: v.shape for k, v in TimmConvNeXtCvStRef(**TINY).state_dict().items()
    }
    vit = randomize(timm.create_model('vit_small_patch16_224', pretrained=False))
    assert {k: v.shape for k, v in vit.state_dict().items()} == {
        k: v.shape for k, v in ViTRef().state_dict().items()
    }
    state, _ = convert_revisiting_at_vit(prefixed(vit.state_dict(), 'model.'))
    model = VisionTransformerStrict(
        img_size=(224, 224),
        embed_dims=384,
        num_layers=12,
        num_heads=6,
        final_norm=True,
        norm_cfg=dict(type='LN', eps=1e-6),
        out_indices=-1,
    )
    model.load_state_dict(state, strict=True)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        (ours,) = model.eval()(x)
        theirs = vit.forward_features(x)[:, 1:]
    torch.testing.assert_close(
        ours, theirs.transpose(1, 2).reshape(1, 384, 14, 14), rtol=1e-4, atol=1e-4
    )


# ----------------------------------------------------------------------------
# The command-line scripts
# ----------------------------------------------------------------------------
def run_cli(monkeypatch, script, *args):
    monkeypatch.setattr(sys, 'argv', [script, *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(osp.join(CONVERTERS, script), run_name='__main__')
    assert exit_.value.code == 0


def test_command_line_converters(tmp_path, monkeypatch, capsys):
    torch.manual_seed(5)
    # An identity normaliser converts as is (another one needs
    # drop_normalizer=True, see test_revisiting_at_normalizer_*).
    vit = prefixed(normalized(ViTRef(depth=1)).state_dict(), 'module.')
    vit['module.normalize.mean'] = torch.zeros(1, 3, 1, 1)
    vit['module.normalize.std'] = torch.ones(1, 3, 1, 1)
    sources = {
        'revisiting_at_convnext.py': prefixed(
            TimmConvNeXtCvStRef(**SHALLOW).state_dict(), 'module.'
        ),
        'revisiting_at_vit.py': vit,
        'robust_segmentation_upernet.py': UperNetRef(
            SHALLOW['depths'], SHALLOW['dims'], 21
        ).state_dict(),
        'robust_segmentation_segmenter.py': SegmenterRef(n_cls=151).state_dict(),
    }
    for script, src in sources.items():
        src_path, dst_path = tmp_path / f'{script}.src', tmp_path / f'{script}.pth'
        torch.save(src, src_path)
        run_cli(monkeypatch, script, src_path, dst_path)
        ckpt = torch.load(dst_path, map_location='cpu', weights_only=True)
        assert tuple(ckpt['meta'])[:4] == CONVERSION_META_KEYS
        assert ckpt['meta']['converter'] == script[:-3]
        assert ckpt['meta']['source'] == osp.basename(src_path)
        assert ckpt['meta']['config'] is None
        assert isinstance(ckpt['meta']['dropped'], list)
        # every tool ends saying where it wrote
        assert (
            capsys.readouterr().out.splitlines()[-1] == f'wrote checkpoint: {dst_path}'
        )
    # A file needing arbitrary unpickling is refused unless trusted.
    bad = tmp_path / 'pickled.pth'
    torch.save(
        {'model': sources['revisiting_at_vit.py'], 'args': argparse.Namespace(lr=0.1)},
        bad,
    )
    with pytest.raises(CheckpointError, match='--unsafe-load') as info:
        run_cli(monkeypatch, 'revisiting_at_vit.py', bad, tmp_path / 'x.pth')
    assert str(bad) in str(info.value)
    assert not (tmp_path / 'x.pth').exists()
    run_cli(
        monkeypatch, 'revisiting_at_vit.py', bad, tmp_path / 'x.pth', '--unsafe-load'
    )
    assert (tmp_path / 'x.pth').exists()


# ----------------------------------------------------------------------------
# The input normaliser of revisiting-at checkpoints (normalize.{mean,std})
# ----------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _with_normalizer(model, mean, std, prefix='module.'):
    src = prefixed(normalized(model).state_dict(), prefix)
    src[prefix + 'normalize.mean'] = torch.tensor(mean).view(1, 3, 1, 1)
    src[prefix + 'normalize.std'] = torch.tensor(std).view(1, 3, 1, 1)
    return src


_CONVERTERS = {
    'convnext': (
        convert_revisiting_at_convnext,
        lambda: TimmConvNeXtCvStRef(**SHALLOW),
    ),
    'vit': (convert_revisiting_at_vit, lambda: ViTRef(depth=1)),
}


@pytest.mark.parametrize('kind', sorted(_CONVERTERS))
def test_revisiting_at_normalizer_refused_naming_the_values(kind):
    # Our models take raw [0, 1] input: silently dropping an ImageNet normaliser
    # would feed the backbone input it was not trained on.
    convert, build = _CONVERTERS[kind]
    src = _with_normalizer(build(), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(CheckpointError) as info:
        convert(src)
    msg = str(info.value)
    for value in ('0.485', '0.456', '0.406', '0.229', '0.224', '0.225'):
        assert value in msg, msg
    # It says what to do: the option, and the data preprocessor values.
    assert 'drop_normalizer=True' in msg
    assert '123.675' in msg and '58.395' in msg, msg
    # One channel off the identity is enough.
    src = _with_normalizer(build(), [0.0, 0.0, 0.0], [1.0, 1.0, 0.5])
    with pytest.raises(CheckpointError, match='0.5'):
        convert(src)


@pytest.mark.parametrize('kind', sorted(_CONVERTERS))
def test_revisiting_at_normalizer_identity_or_absent_is_dropped(kind):
    convert, build = _CONVERTERS[kind]
    torch.manual_seed(8)
    model = build()
    plain, plain_meta = convert(prefixed(model.state_dict(), 'module.'))
    assert 'input_normalizer' not in plain_meta
    state, meta = convert(_with_normalizer(model, [0.0] * 3, [1.0] * 3))
    assert {'normalize.mean', 'normalize.std'} <= set(meta['dropped'])
    assert 'input_normalizer' not in meta
    assert state.keys() == plain.keys()
    for name in state:
        torch.testing.assert_close(state[name], plain[name])


@pytest.mark.parametrize('kind', sorted(_CONVERTERS))
def test_revisiting_at_normalizer_accepted_explicitly(tmp_path, kind):
    convert, build = _CONVERTERS[kind]
    torch.manual_seed(9)
    model = build()
    plain, _ = convert(prefixed(model.state_dict(), 'module.'))
    src = _with_normalizer(model, IMAGENET_MEAN, IMAGENET_STD)
    state, meta = convert(src, drop_normalizer=True)
    assert {'normalize.mean', 'normalize.std'} <= set(meta['dropped'])
    # The values are kept for a config that restores the backbone's input.
    assert meta['input_normalizer'] == dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for name in plain:
        torch.testing.assert_close(state[name], plain[name])
    _, ckpt = write_and_reload(tmp_path, state, meta)
    assert ckpt['meta']['input_normalizer']['std'] == IMAGENET_STD


@pytest.mark.parametrize(
    'script', ['revisiting_at_convnext.py', 'revisiting_at_vit.py']
)
def test_command_line_drop_normalizer(script, tmp_path, monkeypatch, capsys):
    """The released classifiers carry ImageNet's normaliser: the scripts refuse
    it unless --drop-normalizer is given, and record it then."""
    torch.manual_seed(6)
    if script == 'revisiting_at_vit.py':
        src = prefixed(normalized(ViTRef(depth=1)).state_dict(), 'module.')
    else:
        src = prefixed(TimmConvNeXtCvStRef(**SHALLOW).state_dict(), 'module.')
    src['module.normalize.mean'] = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    src['module.normalize.std'] = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    src_path, dst = tmp_path / 'src.pth', tmp_path / 'dst.pth'
    torch.save(src, src_path)
    with pytest.raises(ValueError, match='drop_normalizer'):
        run_cli(monkeypatch, script, src_path, dst)
    assert not dst.exists()
    run_cli(monkeypatch, script, src_path, dst, '--drop-normalizer')
    meta = torch.load(dst, map_location='cpu', weights_only=True)['meta']
    assert meta['input_normalizer']['mean'] == pytest.approx([0.485, 0.456, 0.406])
