"""The strict weight initializer ``init_cfg=dict(type='PretrainedStrict', ...)``
(mmseg_robust/models/backbones/strict_pretrained.py) and its use for the ImageNet
ResNet-50 of the SAT/DDC-AT configs (docs/algorithms.md sections 5.2, 5.3): mmengine's
``Pretrained`` loads with ``strict=False``, so a wrong file would leave a random
backbone after a mere warning."""

import copy
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config

import mmseg_robust  # noqa: F401  (registers PretrainedStrict)
from mmseg_robust.models.checkpoint import CheckpointError
from mmseg_robust.registry import MODELS, WEIGHT_INITIALIZERS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
MODEL_CFGS = [
    osp.join(REPO, 'configs', '_base_', 'models', name)
    for name in ('pspnet_r50-stem128-d8.py', 'deeplabv3_r50-stem128-d8.py')
]
TOP_LEVEL = sorted(
    glob.glob(osp.join(REPO, 'configs', 'sat', '*.py'))
    + glob.glob(osp.join(REPO, 'configs', 'ddcat', '*.py'))
)
CHECKPOINT = 'checkpoints/semseg_resnet50_v2_backbone.pth'


pytestmark = pytest.mark.usefixtures('one_thread_mmseg_scope')


def _backbone_cfg(depth=18):
    """The configs' deep-stem ResNet (depth 18 to stay small), plain BN."""
    cfg = Config.fromfile(MODEL_CFGS[0]).model.backbone.to_dict()
    cfg.update(depth=depth, norm_cfg=dict(type='BN', requires_grad=True))
    return cfg


def _build(init_cfg, depth=18):
    return MODELS.build(dict(_backbone_cfg(depth), init_cfg=init_cfg))


def _file(tmp_path, state, name='backbone.pth', wrap=True):
    path = str(tmp_path / name)
    torch.save({'state_dict': state} if wrap else state, path)
    return path


@pytest.mark.parametrize(
    'path', MODEL_CFGS + TOP_LEVEL, ids=lambda p: osp.relpath(p, REPO)
)
def test_sat_ddcat_configs_initialise_the_resnet_strictly(path):
    cfg = Config.fromfile(path)
    assert cfg.model.backbone.type == 'ResNetV1c'
    assert cfg.model.backbone.init_cfg == dict(
        type='PretrainedStrict', checkpoint=CHECKPOINT
    )


def test_registered_in_mmseg_scope():
    assert 'PretrainedStrict' in WEIGHT_INITIALIZERS.module_dict
    init = WEIGHT_INITIALIZERS.build(dict(type='PretrainedStrict', checkpoint='x.pth'))
    assert (init.checkpoint, init.prefix) == ('x.pth', None)


def test_the_right_file_loads_every_tensor(tmp_path):
    torch.manual_seed(0)
    source = _build(None)
    source.init_weights()
    with torch.no_grad():  # BN statistics too: every buffer must be loaded
        for name, buf in source.named_buffers():
            if buf.is_floating_point():
                buf.copy_(torch.rand_like(buf) + 0.5)
    state = source.state_dict()
    path = _file(tmp_path, state)
    torch.manual_seed(1)
    model = _build(dict(type='PretrainedStrict', checkpoint=path))
    model.init_weights()
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)


def test_prefix_takes_the_backbone_of_a_segmentor_file(tmp_path):
    torch.manual_seed(2)
    state = _build(None).state_dict()
    full = {f'backbone.{k}': v for k, v in state.items()}
    full['decode_head.conv_seg.weight'] = torch.zeros(21, 512, 1, 1)
    path = _file(tmp_path, full)
    model = _build(dict(type='PretrainedStrict', checkpoint=path, prefix='backbone.'))
    model.init_weights()
    for name, tensor in state.items():
        torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)


def _expect_refused(tmp_path, state, *names):
    path = _file(tmp_path, state, name='wrong.pth')
    model = _build(dict(type='PretrainedStrict', checkpoint=path))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError) as info:
        model.init_weights()
    for name in names:
        assert name in str(info.value), str(info.value)
    # Nothing was loaded.
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name])


def test_wrong_or_missing_keys_raise_naming_them(tmp_path):
    torch.manual_seed(3)
    state = _build(None).state_dict()
    missing = dict(state)
    del missing['layer3.1.bn2.running_var']
    _expect_refused(tmp_path, missing, 'layer3.1.bn2.running_var')
    # A file of another layout (e.g. semseg names, not converted).
    renamed = {k.replace('stem.', 'layer0.'): v for k, v in state.items()}
    _expect_refused(tmp_path, renamed, 'stem.0.weight', 'layer0.0.weight')
    extra = dict(state, **{'fc.weight': torch.zeros(1000, 512)})
    _expect_refused(tmp_path, extra, 'fc.weight')
    shaped = dict(state, **{'layer1.0.conv1.weight': torch.zeros(64, 128, 1, 1)})
    _expect_refused(tmp_path, shaped, 'layer1.0.conv1.weight')


def test_mmengine_pretrained_would_only_warn(tmp_path):
    # Why the configs need PretrainedStrict: with the same wrong file, mmengine's
    # Pretrained leaves the random weights in place.
    torch.manual_seed(4)
    state = _build(None).state_dict()
    renamed = {k.replace('stem.', 'layer0.'): v for k, v in state.items()}
    path = _file(tmp_path, renamed, name='renamed.pth')
    model = _build(dict(type='Pretrained', checkpoint=path))
    model.init_weights()  # no error
    assert not torch.equal(model.state_dict()['stem.0.weight'], state['stem.0.weight'])


def test_children_do_not_reinitialise_the_loaded_weights(tmp_path):
    # mmengine runs initializers other than 'Pretrained' before the children's
    # own init_weights: a child with an init_cfg must not overwrite the file.
    from mmengine.model import BaseModule

    class Child(BaseModule):
        def __init__(self):
            super().__init__(
                init_cfg=dict(type='Constant', layer='Conv2d', val=0.0, bias=0.0)
            )
            self.conv = torch.nn.Conv2d(3, 4, 3)

    class Parent(BaseModule):
        def __init__(self, init_cfg=None):
            super().__init__(init_cfg=init_cfg)
            self.child = Child()

    torch.manual_seed(5)
    state = Parent().state_dict()
    path = _file(tmp_path, state)
    model = Parent(init_cfg=dict(type='PretrainedStrict', checkpoint=path))
    model.init_weights()
    torch.testing.assert_close(model.child.conv.weight, state['child.conv.weight'])
    assert model.child.conv.weight.abs().sum() > 0
