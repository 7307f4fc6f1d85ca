"""Export of DDC-AT models as plain PSPNet / DeepLabv3 (cls1 only)."""

import importlib.util
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

import mmseg_robust.models.decode_heads  # noqa: F401  (registers the heads)
from mmseg_robust.models.checkpoint import CheckpointError
from mmseg_robust.models.converters import (
    export_plain_state_dict,
    plain_head_cfg,
    plain_model_cfg,
)
from mmseg_robust.registry import MODELS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


pytestmark = pytest.mark.usefixtures('one_thread_mmseg_scope')


def test_plain_head_cfg():
    assert plain_head_cfg(
        dict(type='DDCATPSPHead', loss_mask_weight=1.0, channels=8)
    ) == dict(type='PSPHead', channels=8)
    assert plain_head_cfg(dict(type='DDCATASPPHead')) == dict(
        type='DeepLabV3Head', bottleneck_kernel_size=1
    )
    assert plain_head_cfg(
        dict(type='mmseg.DDCATASPPHead', bottleneck_kernel_size=3)
    ) == dict(type='mmseg.ASPPHead')
    with pytest.raises(ValueError, match='not a DDC-AT decode head'):
        plain_head_cfg(dict(type='PSPHead'))


@pytest.mark.parametrize('head_type', ['DDCATPSPHead', 'DDCATASPPHead'])
def test_exported_model_gives_cls1_logits_exactly(head_type, tiny_models):
    cfg = tiny_models.tiny_segmentor_cfg(head_type)
    model = tiny_models.trained_like(MODELS.build(cfg))
    plain = MODELS.build(plain_model_cfg(cfg)).eval()
    sd = export_plain_state_dict(model.state_dict())
    assert not any('cls2' in k or 'mask1' in k for k in sd)
    plain.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 33, 33)
    metas = [dict(img_shape=(33, 33), pad_shape=(33, 33))] * 2
    with torch.no_grad():
        cls1 = model.decode_head.branch_logits(model.extract_feat(x))[0]
        cls1 = nn.functional.interpolate(
            cls1, (33, 33), mode='bilinear', align_corners=True
        )
        ours = model.encode_decode(x, metas)
        exported = plain.encode_decode(x, metas)
        routed = model.decode_head.routed_logits(model.extract_feat(x), size=(33, 33))
    assert torch.equal(exported, ours) and torch.equal(exported, cls1)
    assert not torch.equal(exported, routed)  # the routing was really dropped
    with pytest.raises(CheckpointError, match='not a DDC-AT checkpoint'):
        export_plain_state_dict(sd)


def test_export_tool(tmp_path, capsys, tiny_models):
    cfg = Config(
        dict(
            default_scope='mmseg',
            custom_imports=dict(imports=['mmseg_robust']),
            model=tiny_models.tiny_segmentor_cfg('DDCATASPPHead'),
            train_cfg=dict(type='AdversarialTrainLoop', scheme='ddcat', max_iters=10),
        )
    )
    cfg_path, ckpt_path = tmp_path / 'ddcat.py', tmp_path / 'iter_10.pth'
    cfg.dump(str(cfg_path))
    model = tiny_models.trained_like(MODELS.build(cfg.model))
    torch.save(
        dict(
            meta=dict(iter=10, dataset_meta=dict(classes=('a', 'b', 'c', 'd'))),
            state_dict=model.state_dict(),
        ),
        ckpt_path,
    )
    path = osp.join(REPO, 'tools', 'model_converters', 'export_ddcat.py')
    spec = importlib.util.spec_from_file_location('export_ddcat_tool', path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / 'plain.pth'
    assert tool.main([str(cfg_path), str(ckpt_path), str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        f'wrote plain checkpoint: {out}',
        f'wrote plain config: {tmp_path / "plain.py"}',
    ]
    plain_cfg = Config.fromfile(str(tmp_path / 'plain.py'))
    assert plain_cfg.model.decode_head.type == 'DeepLabV3Head'
    written = torch.load(out, map_location='cpu', weights_only=True)
    assert written['meta']['dataset_meta']['classes'] == ('a', 'b', 'c', 'd')
    # the provenance in the vocabulary every converter writes; mmengine's keys
    # of the training checkpoint stay
    from mmseg_robust.models.checkpoint import CONVERSION_META_KEYS

    assert set(CONVERSION_META_KEYS) <= set(written['meta'])
    assert written['meta']['converter'] == 'export_ddcat'
    assert written['meta']['source'] == osp.basename(str(ckpt_path))
    assert written['meta']['config'] == str(cfg_path)
    assert 'decode_head.mask1.weight' in written['meta']['dropped']
    assert 'cfg' in written['meta'] and 'ddcat_export' not in written['meta']
    plain = MODELS.build(plain_cfg.model).eval()
    plain.load_state_dict(written['state_dict'], strict=True)
    x = torch.randn(1, 3, 25, 25)
    metas = [dict(img_shape=(25, 25), pad_shape=(25, 25))]
    with torch.no_grad():
        assert torch.equal(plain.encode_decode(x, metas), model.encode_decode(x, metas))
