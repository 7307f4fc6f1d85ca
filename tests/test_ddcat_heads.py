"""DDC-AT heads (docs/algorithms.md section 5.3): routing, division labels, loss,
eval."""

import pytest
import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample

import mmseg_robust.models.decode_heads  # noqa: F401  (registers the heads)
from mmseg_robust.models.decode_heads import (
    DDCATASPPHead,
    DDCATPSPHead,
    division_labels,
    route_logits,
)
from mmseg_robust.registry import MODELS

HEADS = ['DDCATPSPHead', 'DDCATASPPHead']


pytestmark = pytest.mark.usefixtures('one_thread_mmseg_scope')


def make_head(head_type='DDCATPSPHead', **kwargs):
    cfg = dict(
        type=head_type,
        in_channels=8,
        channels=4,
        num_classes=3,
        in_index=0,
        dropout_ratio=0.1,
        norm_cfg=dict(type='BN'),
        align_corners=True,
        loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0, avg_non_ignore=True),
    )
    cfg.update(kwargs)
    torch.manual_seed(0)
    head = MODELS.build(cfg)
    head.init_weights()
    return head


def samples(labels, division=None):
    out = []
    for i in range(labels.shape[0]):
        s = SegDataSample(metainfo=dict(img_shape=tuple(labels.shape[1:])))
        s.gt_sem_seg = PixelData(data=labels[i : i + 1].long())
        if division is not None:
            s.gt_division = PixelData(data=division[i : i + 1].long())
        out.append(s)
    return out


# one image, K=2 classes, 2x2 pixels; mask1 routes pixels (0,1) and (1,0) to cls2,
# pixel (1,1) is a tie and stays with cls1
CLS1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.5, 0.0], [-1.0, 2.0]]]])
CLS2 = torch.tensor([[[[9.0, -2.0], [0.0, 7.0]], [[8.0, 5.0], [6.0, -3.0]]]])
MASK1 = torch.tensor([[[[2.0, 0.0], [-1.0, 0.5]], [[1.0, 3.0], [1.0, 0.5]]]])
ROUTED = torch.tensor([[[[1.0, -2.0], [0.0, 4.0]], [[0.5, 5.0], [6.0, 2.0]]]])


def test_route_logits_hand_example():
    assert torch.equal(route_logits(CLS1, CLS2, MASK1), ROUTED)
    # the formula of the paper, m*cls2 + (1-m)*cls1
    m = MASK1.argmax(1, keepdim=True).float()
    assert torch.equal(m * CLS2 + (1 - m) * CLS1, ROUTED)
    with pytest.raises(ValueError, match='mask1'):
        route_logits(CLS1, CLS2, MASK1[:, :1])


def test_division_labels_hand_example():
    clean = torch.tensor([[[0, 1, 2], [3, 3, 1]]])
    adv = torch.tensor([[[0, 2, 2], [3, 1, 1]]])
    div = division_labels(clean, adv)
    assert div.dtype == torch.long
    assert torch.equal(div, torch.tensor([[[0, 1, 0], [0, 1, 0]]]))
    with pytest.raises(ValueError, match='shape'):
        division_labels(clean, adv[:, :1])
    with pytest.raises(TypeError, match='argmax'):
        division_labels(clean.float(), adv)


@pytest.mark.parametrize('head_type', HEADS)
def test_routed_logits_from_branches(head_type, monkeypatch):
    head = make_head(head_type, num_classes=2)
    monkeypatch.setattr(head, 'branch_logits', lambda inputs: (CLS1, CLS2, MASK1))
    assert torch.equal(head.routed_logits([None]), ROUTED)
    # with size: upsample all branches first, then route (the reference)
    size = (3, 3)
    up = [
        F.interpolate(t, size, mode='bilinear', align_corners=True)
        for t in (CLS1, CLS2, MASK1)
    ]
    m = up[2].argmax(1, keepdim=True) == 1
    expected = torch.where(m, up[1], up[0])
    assert torch.equal(head.routed_logits([None], size=size), expected)


@pytest.mark.parametrize('head_type', HEADS)
def test_eval_forward_is_cls1_and_plain_head(head_type):
    head = make_head(head_type).eval()
    x = [torch.randn(2, 8, 5, 5)]
    cls1, cls2, mask1 = head.branch_logits(x)
    assert cls1.shape == cls2.shape == (2, 3, 5, 5) and mask1.shape == (2, 2, 5, 5)
    assert torch.equal(head(x), cls1)
    assert not torch.equal(cls1, cls2)
    # the plain head with the same weights predicts exactly the same
    plain_type = 'PSPHead' if head_type == 'DDCATPSPHead' else 'DeepLabV3Head'
    plain = make_head(plain_type).eval()
    sd = {
        k: v
        for k, v in head.state_dict().items()
        if not k.startswith(('cls2', 'mask1'))
    }
    plain.load_state_dict(sd, strict=True)
    metas = [dict(img_shape=(17, 17), pad_shape=(17, 17))] * 2
    assert torch.equal(head.predict(x, metas, None), plain.predict(x, metas, None))
    assert isinstance(head, DDCATPSPHead if head_type == HEADS[0] else DDCATASPPHead)


def test_loss_matches_hand_computation(monkeypatch):
    head = make_head(num_classes=2)
    monkeypatch.setattr(head, 'branch_logits', lambda inputs: (CLS1, CLS2, MASK1))
    labels = torch.tensor([[[0, 1], [255, 1]]])  # one ignored pixel
    division = torch.tensor([[[1, 0], [1, 1]]])  # incl. the ignored pixel
    losses = head.loss([None], samples(labels, division), None)
    # CE(final, y) averaged over the 3 labelled pixels
    logp = ROUTED.log_softmax(1)[0]
    ce = -(logp[0, 0, 0] + logp[1, 0, 1] + logp[1, 1, 1]) / 3
    # CE(mask1, division) averaged over all 4 pixels, no ignore index
    logq = MASK1.log_softmax(1)[0]
    ce_mask = -(logq[1, 0, 0] + logq[0, 0, 1] + logq[1, 1, 0] + logq[1, 1, 1]) / 4
    assert torch.allclose(losses['loss_ce'], ce, atol=1e-6)
    assert torch.allclose(losses['loss_mask'], ce_mask, atol=1e-6)
    # routed predictions [[0, 1], [1, 0]]: 2 of the 3 labelled pixels right
    assert torch.allclose(losses['acc_seg'], torch.tensor([200 / 3]))
    head.loss_mask_weight = 0.5
    losses = head.loss([None], samples(labels, division), None)
    assert torch.allclose(losses['loss_mask'], 0.5 * ce_mask, atol=1e-6)


@pytest.mark.parametrize('head_type', HEADS)
def test_loss_upsamples_then_routes_and_no_grad_through_routing(head_type):
    head = make_head(head_type).train()
    x = [torch.randn(2, 8, 5, 5)]
    labels = torch.randint(0, 3, (2, 17, 17))
    labels[:, :3] = 255
    division = torch.randint(0, 2, (2, 17, 17))
    torch.manual_seed(1)
    losses = head.loss(x, samples(labels, division), None)
    assert set(losses) == {'loss_ce', 'loss_mask', 'acc_seg', 'acc_mask'}
    torch.manual_seed(1)  # same dropout masks
    up = [
        F.interpolate(t, (17, 17), mode='bilinear', align_corners=True)
        for t in head.branch_logits(x)
    ]
    final = torch.where(up[2].argmax(1, keepdim=True) == 1, up[1], up[0])
    assert torch.allclose(
        losses['loss_ce'], F.cross_entropy(final, labels, ignore_index=255)
    )
    assert torch.allclose(losses['loss_mask'], F.cross_entropy(up[2], division))
    # the routing is hard: the segmentation loss gives mask1 no gradient
    head.zero_grad()
    losses['loss_ce'].backward(retain_graph=True)
    assert head.mask1.weight.grad is None or not head.mask1.weight.grad.any()
    assert head.conv_seg.weight.grad.abs().sum() > 0
    losses['loss_mask'].backward()
    assert head.mask1.weight.grad.abs().sum() > 0


def test_missing_division_labels_raise():
    head = make_head().train()
    labels = torch.zeros(2, 9, 9, dtype=torch.long)
    with pytest.raises(ValueError) as err:
        head.loss([torch.randn(2, 8, 3, 3)], samples(labels), None)
    msg = str(err.value)
    assert 'gt_division' in msg and 'AdversarialTrainLoop' in msg
    assert "scheme='ddcat'" in msg
    with pytest.raises(ValueError, match='shape'):
        head.loss(
            [torch.randn(2, 8, 3, 3)], samples(labels, torch.zeros(2, 8, 9)), None
        )
    with pytest.raises(ValueError, match='0/1'):
        head.loss(
            [torch.randn(2, 8, 3, 3)], samples(labels, torch.full((2, 9, 9), 2)), None
        )


def test_aspp_bottleneck_kernel():
    assert make_head('DDCATASPPHead').bottleneck.conv.kernel_size == (1, 1)
    head = make_head('DDCATASPPHead', bottleneck_kernel_size=3)
    assert head.cls2_bottleneck.conv.kernel_size == (3, 3)
    assert head.mask1_bottleneck.conv.padding == (1, 1)
    assert make_head('DeepLabV3Head').bottleneck.conv.kernel_size == (1, 1)
