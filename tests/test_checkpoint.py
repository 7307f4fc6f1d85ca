"""mmseg_robust/models/checkpoint.py: reading checkpoint files, finding their state
dict, and checking it against a model (the one check the strict pretrained init,
the converters and the evaluation loop share)."""

import argparse
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from mmengine.registry import DefaultScope

import mmseg_robust.models.decode_heads  # noqa: F401  (registers the heads)
from mmseg_robust.models.checkpoint import (
    CheckpointError,
    check_checkpoint_fits,
    check_state_dict,
    expected_shapes,
    load_checkpoint_file,
    save_checkpoint,
    unwrap_state_dict,
)
from mmseg_robust.registry import MODELS

pytestmark = pytest.mark.usefixtures('one_thread_mmseg_scope')


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def _ddp(module):
    """``module`` in an mmengine DDP wrapper, without a process group (only
    ``.module`` is used)."""
    from mmengine.model import MMDistributedDataParallel

    wrapper = MMDistributedDataParallel.__new__(MMDistributedDataParallel)
    nn.Module.__init__(wrapper)
    wrapper.module = module
    return wrapper


def _state():
    torch.manual_seed(0)
    return _net().state_dict()


# ----------------------------------------------------------------------------
# load_checkpoint_file / unwrap_state_dict / save_checkpoint
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    'wrap',
    [
        lambda sd: sd,
        lambda sd: {'state_dict': sd, 'meta': {'iter': 3}},
        lambda sd: {'model': sd, 'epoch': 7},
        lambda sd: {'state_dict': {'module.' + k: v for k, v in sd.items()}},
        lambda sd: {'module.' + k: v for k, v in sd.items()},
    ],
    ids=['plain', 'mmengine', 'timm', 'ddp-in-state_dict', 'ddp'],
)
def test_unwrap_variants(wrap):
    sd = _state()
    out = unwrap_state_dict(wrap(sd))
    assert list(out) == list(sd)  # names and order, prefix gone
    for k in sd:
        assert out[k] is sd[k]


def test_unwrap_errors_name_the_source():
    with pytest.raises(CheckpointError, match='run.pth.*no state dict.*epoch'):
        unwrap_state_dict({'epoch': 3, 'optimizer': {}}, 'run.pth')
    with pytest.raises(CheckpointError, match='a list'):
        unwrap_state_dict([torch.zeros(1)], 'x.pth')
    with pytest.raises(CheckpointError, match="'module.a'"):
        unwrap_state_dict({'a': torch.zeros(1), 'module.a': torch.zeros(1)})
    with pytest.raises(CheckpointError, match='no state dict'):
        unwrap_state_dict({})
    # one error type, a ValueError (no KeyError base: printed unquoted)
    err = CheckpointError('line one\nline two')
    assert isinstance(err, ValueError) and not isinstance(err, KeyError)
    assert str(err) == 'line one\nline two'


def test_save_and_load_round_trip(tmp_path):
    sd = _state()
    path = str(tmp_path / 'sub' / 'a.pth')
    assert save_checkpoint(path, sd, {'converter': 'x', 'n': [1, 2]}) == path
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    assert set(ckpt) == {'state_dict', 'meta'}
    for mmap in (False, True):
        loaded = unwrap_state_dict(load_checkpoint_file(path, mmap=mmap))
        assert list(loaded) == list(sd)
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_load_refuses_unsafe_files_naming_file_and_fix(tmp_path):
    path = tmp_path / 'pickled.pth'
    torch.save({'state_dict': _state(), 'args': argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(str(path))
    assert str(path) in str(info.value)
    assert '--unsafe-load' in str(info.value) and 'trust=True' in str(info.value)
    obj = load_checkpoint_file(str(path), trust=True)
    assert obj['args'].lr == 0.1
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_checkpoint_file(str(tmp_path / 'nope.pth'))
    (tmp_path / 'junk.pth').write_text('not a checkpoint')
    with pytest.raises(CheckpointError, match='junk.pth'):
        load_checkpoint_file(str(tmp_path / 'junk.pth'), trust=True)


# ----------------------------------------------------------------------------
# expected_shapes / check_state_dict
# ----------------------------------------------------------------------------
def test_expected_shapes_of_modules_wrappers_and_configs():
    net = _net()
    shapes = expected_shapes(net)
    assert shapes == {k: v.shape for k, v in net.state_dict().items()}
    assert all(isinstance(s, torch.Size) for s in shapes.values())

    assert expected_shapes(_ddp(net)) == shapes
    head = dict(
        type='FCNHead',
        in_channels=8,
        channels=4,
        num_convs=1,
        num_classes=3,
        in_index=0,
    )
    from_cfg = expected_shapes(head)  # built on the meta device
    built = MODELS.build(head)
    assert from_cfg == {k: v.shape for k, v in built.state_dict().items()}
    assert expected_shapes(head, prefix='conv_seg.') == {
        'weight': torch.Size([3, 4, 1, 1]),
        'bias': torch.Size([3]),
    }


def test_check_state_dict_names_missing_unexpected_and_misshapen():
    expected = expected_shapes(_net())
    sd = dict(_state())
    assert check_state_dict(dict(sd), expected) == []  # a good one passes
    bad = dict(sd)
    del bad['1.running_var']
    bad['head.fc.weight'] = torch.zeros(3)
    bad['2.weight'] = torch.zeros(2, 4, 3, 3)
    with pytest.raises(CheckpointError) as info:
        check_state_dict(bad, expected, what='the file x.pth', hint='Do this.')
    msg = str(info.value)
    assert msg.startswith('the file x.pth does not fit the model:')
    assert 'missing in the checkpoint (1): 1.running_var' in msg
    assert 'not in the model (1): head.fc.weight' in msg
    assert (
        'wrong shape (1): 2.weight: (2, 4, 3, 3) in the checkpoint, '
        '(2, 4, 1, 1) in the model'
    ) in msg
    assert msg.endswith('\nDo this.')
    # each kind alone
    with pytest.raises(CheckpointError, match='missing in the checkpoint'):
        check_state_dict({k: v for k, v in sd.items() if k != '0.bias'}, expected)
    with pytest.raises(CheckpointError, match=r'wrong shape \(1\): 0.bias'):
        check_state_dict(dict(sd, **{'0.bias': torch.zeros(5)}), expected)
    # long lists are cut, with the count
    many = {f'extra.{i:02d}': torch.zeros(1) for i in range(25)}
    with pytest.raises(CheckpointError) as info:
        check_state_dict(dict(sd, **many), expected)
    msg = str(info.value)
    assert 'not in the model (25)' in msg and 'extra.19' in msg
    assert 'extra.20' not in msg and '... and 5 more' in msg


def test_check_state_dict_source_names_and_num_batches_tracked():
    expected = expected_shapes(_net())
    sd = {k: v for k, v in _state().items() if 'num_batches_tracked' not in k}
    with pytest.raises(CheckpointError, match='1.num_batches_tracked'):
        check_state_dict(dict(sd), expected)  # not filled by default
    filled = check_state_dict(sd, expected, fill_num_batches_tracked=True)
    assert filled == ['1.num_batches_tracked']
    assert sd['1.num_batches_tracked'].dtype == torch.long
    assert int(sd['1.num_batches_tracked']) == 0
    # converted tensors are named with their source
    bad = dict(sd, **{'2.weight': torch.zeros(2, 4, 3, 3), 'x': torch.zeros(1)})
    with pytest.raises(CheckpointError) as info:
        check_state_dict(
            bad, expected, source_names={'2.weight': 'cls.4.weight', 'x': 'aux.x'}
        )
    assert '2.weight (from cls.4.weight): (2, 4, 3, 3)' in str(info.value)
    assert 'x (from aux.x)' in str(info.value)
    # nothing is filled when the check fails
    partial = {k: v for k, v in sd.items() if k != '1.num_batches_tracked'}
    del partial['0.bias']
    with pytest.raises(CheckpointError):
        check_state_dict(partial, expected, fill_num_batches_tracked=True)
    assert '1.num_batches_tracked' not in partial


# ----------------------------------------------------------------------------
# check_checkpoint_fits
# ----------------------------------------------------------------------------
def _segmentor_cfg(head_type):
    norm = dict(type='BN', requires_grad=True)
    return dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor'),
        backbone=dict(
            type='ResNetV1c',
            depth=18,
            base_channels=8,
            stem_channels=8,
            num_stages=4,
            out_indices=(3,),
            norm_cfg=norm,
        ),
        decode_head=dict(
            type=head_type,
            in_channels=64,
            in_index=0,
            channels=8,
            pool_scales=(1, 2),
            num_classes=3,
            norm_cfg=norm,
            align_corners=False,
        ),
        train_cfg=dict(),
        test_cfg=dict(mode='whole'),
    )


@pytest.fixture(scope='module')
def models():
    with DefaultScope.overwrite_default_scope('mmseg'):
        return (
            MODELS.build(_segmentor_cfg('PSPHead')),
            MODELS.build(_segmentor_cfg('DDCATPSPHead')),
        )


def test_check_checkpoint_fits_passes_a_good_checkpoint(tmp_path, models):
    plain, ddcat = models
    for model in (plain, ddcat):
        path = str(tmp_path / 'good.pth')
        torch.save({'meta': {'iter': 1}, 'state_dict': model.state_dict()}, path)
        check_checkpoint_fits(path, model)
    # a DDP-saved one (module. prefix) fits too; the model may be wrapped
    torch.save({'module.' + k: v for k, v in plain.state_dict().items()}, path)
    check_checkpoint_fits(path, plain)
    check_checkpoint_fits(path, _ddp(plain))


def test_check_checkpoint_fits_names_tensors_and_hint(tmp_path, models):
    plain, _ = models
    sd = plain.state_dict()
    sd['decode_head.conv_seg.weight'] = torch.zeros(5, 8, 1, 1)
    path = str(tmp_path / 'five_classes.pth')
    torch.save({'state_dict': sd}, path)
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_fits(path, plain)
    msg = str(info.value)
    assert msg.startswith(f'the checkpoint {path} does not fit the model')
    assert 'decode_head.conv_seg.weight: (5, 8, 1, 1) in the checkpoint' in msg
    assert 'num_classes' in msg and 'tools/model_converters' in msg
    assert 'export_ddcat' not in msg
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_fits(path, plain, what='W', hint='H')
    assert str(info.value).startswith('W does not fit the model')
    assert str(info.value).endswith('\nH')
    with pytest.raises(FileNotFoundError):
        check_checkpoint_fits(str(tmp_path / 'missing.pth'), plain)


def test_ddcat_checkpoint_against_plain_model_names_the_export(tmp_path, models):
    plain, ddcat = models
    path = str(tmp_path / 'iter_100.pth')
    torch.save({'meta': {'iter': 100}, 'state_dict': ddcat.state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_fits(path, plain)
    msg = str(info.value)
    assert 'decode_head.cls2.weight' in msg  # the mismatch itself
    assert 'DDC-AT training checkpoint' in msg
    assert (
        f'python tools/model_converters/export_ddcat.py DDCAT_CONFIG {path} OUT.pth'
    ) in msg
    # the other way round is no DDC-AT export case
    torch.save({'state_dict': plain.state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_fits(path, ddcat)
    assert 'export_ddcat' not in str(info.value)
    assert 'decode_head.mask1.weight' in str(info.value)


def test_reference_semseg_checkpoint_names_the_converter(tmp_path, models):
    plain, _ = models
    path = str(tmp_path / 'train_epoch_50.pth')
    torch.save(
        {
            'state_dict': OrderedDict(
                [
                    ('module.layer0.0.weight', torch.zeros(8, 3, 3, 3)),
                    ('module.cls1.4.weight', torch.zeros(3, 8, 1, 1)),
                ]
            )
        },
        path,
    )
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_fits(path, plain)
    assert f'python tools/model_converters/ddcat_semseg.py {path}' in str(info.value)


def test_conversion_meta_is_the_one_provenance_vocabulary():
    from mmseg_robust.models.checkpoint import CONVERSION_META_KEYS, conversion_meta

    meta = conversion_meta('x', '/a/b/src.pth', ('fc.w',), 'cfg.py', arch='tiny')
    assert tuple(meta)[:4] == CONVERSION_META_KEYS
    assert meta == dict(
        converter='x', source='src.pth', config='cfg.py', dropped=['fc.w'], arch='tiny'
    )
