"""Per-pixel objectives (docs/algorithms.md section 2) against hand computations."""

import math

import pytest
import torch

from mmseg_robust.attacks import (
    OBJECTIVE_NAMES,
    BalancedMaskedCrossEntropy,
    CosPGDLoss,
    build_objective,
    class_weights_from_counts,
    count_label_pixels,
    load_class_weights,
    objective_names,
)
from mmseg_robust.registry import ATTACKS, OBJECTIVES

pytestmark = pytest.mark.usefixtures('attack_one_thread')

LOG2 = math.log(2.0)

# One image, K=3 classes, 1x2 pixels. Pixel 0: label 0, predicted 0 (correct).
# Pixel 1: label 2, predicted 1 (wrong).
Z = torch.tensor([[[[2.0, 0.5]], [[1.0, 3.0]], [[-1.0, 1.0]]]])  # (1, 3, 1, 2)
Y = torch.tensor([[[0, 2]]])


def _softmax(zs):
    e = [math.exp(v) for v in zs]
    return [v / sum(e) for v in e]


def _pixel(j):
    return [Z[0, k, 0, j].item() for k in range(3)], Y[0, 0, j].item()


def _ce(j):
    zs, y = _pixel(j)
    return -math.log(_softmax(zs)[y])


def test_all_spec_names_are_registered():
    assert OBJECTIVE_NAMES == (
        'CE',
        'Mask-CE',
        'Mask-CE-Bal',
        'JS-Avg',
        'SegPGD',
        'CosPGD',
        'Mask-Sph',
        'Tsallis-CE',
    )
    for name in OBJECTIVE_NAMES:
        assert OBJECTIVES.get(name) is not None, name
    assert objective_names()[:8] == list(OBJECTIVE_NAMES)


def test_ce_by_hand_and_normalised_by_all_pixels():
    out = build_objective('CE')(Z, Y)
    assert out.shape == (1,)
    assert out.item() == pytest.approx((_ce(0) + _ce(1)) / 2, rel=1e-6)


def test_normalisation_is_by_h_times_w_not_by_valid_pixels():
    valid = torch.tensor([[[True, False]]])
    out = build_objective('CE')(Z, Y, valid)
    assert out.item() == pytest.approx(_ce(0) / 2, rel=1e-6)  # not / 1
    ignored = Y.clone()
    ignored[0, 0, 0] = 255
    assert build_objective('CE')(Z, ignored).item() == pytest.approx(
        _ce(1) / 2, rel=1e-6
    )
    # ignore index configurable
    other = Y.clone()
    other[0, 0, 1] = 7
    obj = build_objective(dict(type='CE', ignore_index=7))
    assert obj(Z, other).item() == pytest.approx(_ce(0) / 2, rel=1e-6)


def test_mask_ce_drops_wrong_pixels():
    out = build_objective('Mask-CE')(Z, Y)
    assert out.item() == pytest.approx(_ce(0) / 2, rel=1e-6)
    # pixel 1 becomes correct again -> it returns
    z = Z.clone()
    z[0, 2, 0, 1] = 5.0
    zs = [z[0, k, 0, 1].item() for k in range(3)]
    expected = (_ce(0) - math.log(_softmax(zs)[2])) / 2
    assert build_objective('Mask-CE')(z, Y).item() == pytest.approx(expected, rel=1e-6)


def test_mask_ce_bal_weights_correct_pixels_by_label_class():
    w = [0.2, 0.3, 0.5]
    obj = build_objective(dict(type='Mask-CE-Bal', class_weights=w))
    assert obj(Z, Y).item() == pytest.approx(0.2 * _ce(0) / 2, rel=1e-6)
    z = Z.clone()
    z[0, 2, 0, 1] = 5.0  # pixel 1 (label 2) now correct: weight 0.5, no renormalising
    zs = [z[0, k, 0, 1].item() for k in range(3)]
    expected = (0.2 * _ce(0) - 0.5 * math.log(_softmax(zs)[2])) / 2
    assert obj(z, Y).item() == pytest.approx(expected, rel=1e-6)


def test_js_by_hand():
    out = build_objective('JS-Avg')(Z, Y)
    total = 0.0
    for j in range(2):
        zs, y = _pixel(j)
        p = _softmax(zs)
        q = [1.0 if k == y else 0.0 for k in range(3)]
        m = [(a + b) / 2 for a, b in zip(p, q)]
        kl_pm = sum(a * math.log(a / c) for a, c in zip(p, m) if a > 0)
        kl_qm = sum(a * math.log(a / c) for a, c in zip(q, m) if a > 0)
        total += 0.5 * (kl_pm + kl_qm)
    assert out.item() == pytest.approx(total / 2, rel=1e-5)


def test_js_matches_direct_formula_on_random_logits_and_is_bounded():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 3, 4, generator=g) * 3
    y = torch.randint(0, 5, (2, 3, 4), generator=g)
    p = z.softmax(1)
    q = torch.nn.functional.one_hot(y, 5).permute(0, 3, 1, 2).float()
    m = (p + q) / 2
    kl = (p * (p / m).log()).sum(1) + torch.xlogy(q, q / m).sum(1)
    direct = (0.5 * kl).sum((1, 2)) / 12
    assert torch.allclose(build_objective('JS-Avg')(z, y), direct, atol=1e-6)
    assert (build_objective('JS-Avg')(z, y) <= LOG2).all()


def test_js_is_nan_free_for_saturated_logits():
    # every pixel is saturated: confidently right, confidently wrong, and ties
    z = torch.tensor([[[[1e4, -1e4, 1e4]], [[-1e4, 1e4, 1e4]]]], requires_grad=True)
    y = torch.tensor([[[0, 0, 1]]])
    obj = build_objective('JS-Avg')
    out = obj(z, y)
    (grad,) = torch.autograd.grad(out.sum(), z)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    # per pixel: 0 (right), log 2 (wrong), JS(p_y = 1/2)
    half = LOG2 + 0.5 * (0.5 * math.log(0.5) - 1.5 * math.log(1.5))
    assert out.item() == pytest.approx((0 + LOG2 + half) / 3, rel=1e-5)
    assert out.item() <= LOG2


def test_segpgd_lambda_schedule():
    obj = build_objective('SegPGD')
    # t = 1: lambda = 0 -> correct pixels only
    out = obj(Z, Y, step=1, total_steps=10).item()
    assert out == pytest.approx(_ce(0) / 2, rel=1e-6)
    for t in (3, 10):
        lam = (t - 1) / (2 * 10)
        expected = ((1 - lam) * _ce(0) + lam * _ce(1)) / 2
        out = obj(Z, Y, step=t, total_steps=10).item()
        assert out == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize('activation', ['softmax', 'sigmoid'])
def test_cospgd_value_and_detached_factor(activation):
    z = Z.clone().requires_grad_(True)
    obj = build_objective(dict(type='CosPGD', activation=activation))
    out = obj(z, Y)
    act = z.detach().softmax(1) if activation == 'softmax' else z.detach().sigmoid()
    cos = []
    for j in range(2):
        a = act[0, :, 0, j]
        cos.append((a[Y[0, 0, j]] / a.norm()).item())
    assert out.item() == pytest.approx(
        (cos[0] * _ce(0) + cos[1] * _ce(1)) / 2, rel=1e-6
    )
    # the cosine factor is a constant for autograd: grad = cos * dCE/dz / (H*W)
    (grad,) = torch.autograd.grad(out.sum(), z)
    p = z.detach().softmax(1)
    onehot = torch.nn.functional.one_hot(Y, 3).permute(0, 3, 1, 2).float()
    cos_map = torch.tensor(cos).view(1, 1, 1, 2)
    assert torch.allclose(grad, cos_map * (p - onehot) / 2, atol=1e-6)


def test_cospgd_rejects_unknown_activation():
    with pytest.raises(ValueError, match='softmax'):
        CosPGDLoss(activation='relu')


def test_mask_sph_by_hand():
    out = build_objective('Mask-Sph')(Z, Y)
    zs, y = _pixel(0)
    expected = -zs[y] / math.sqrt(sum(v * v for v in zs))
    assert out.item() == pytest.approx(expected / 2, rel=1e-6)  # pixel 1 is wrong


def _tsallis(p, q):
    """``-ln_q(p) = (1 - p^(1 - q)) / (1 - q)``, ``-ln p`` at ``q = 1``."""
    return -math.log(p) if q == 1 else (1 - p ** (1 - q)) / (1 - q)


@pytest.mark.parametrize(
    'step,total,q', [(1, 4, -2.0), (2, 4, -1.0), (3, 4, 0.0), (4, 4, 1.0), (5, 4, 1.0)]
)
def test_tsallis_ce_by_hand_with_its_q_schedule(step, total, q):
    """q moves linearly from -2 (step 1) to 1 (step T); the value is
    ``(1 - p_y^(1-q)) / (1-q)`` on every valid pixel, the CE at q = 1."""
    obj = build_objective('Tsallis-CE')
    assert obj.q(step, total) == q
    out = obj(Z, Y, step=step, total_steps=total)
    expected = [_tsallis(_softmax(_pixel(j)[0])[_pixel(j)[1]], q) for j in (0, 1)]
    assert out.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    if q == 1:
        assert out.item() == pytest.approx((_ce(0) + _ce(1)) / 2, rel=1e-6)


def test_tsallis_ce_gradient_by_hand_and_finite_differences():
    """d/dz_k of ``(1 - p_y^a) / a`` (a = 1 - q) is ``-p_y^a (onehot_k - p_k)``:
    the CE gradient ``p - onehot`` scaled by ``p_y^a``; and float64 finite
    differences agree."""
    z = Z.double().clone().requires_grad_(True)
    obj = build_objective(dict(type='Tsallis-CE', q_start=-0.5, q_end=1.0))
    (grad,) = torch.autograd.grad(obj(z, Y, step=1, total_steps=3).sum(), z)
    for j in (0, 1):
        zs, y = _pixel(j)
        p = _softmax(zs)
        for k in range(3):
            by_hand = p[y] ** 1.5 * (p[k] - (k == y)) / 2  # / (H*W)
            assert grad[0, k, 0, j].item() == pytest.approx(by_hand, rel=1e-9)
    h = 1e-6
    for k, j in ((0, 0), (2, 1)):
        zp, zm = Z.double().clone(), Z.double().clone()
        zp[0, k, 0, j] += h
        zm[0, k, 0, j] -= h
        fd = (obj(zp, Y, step=2, total_steps=3) - obj(zm, Y, step=2, total_steps=3)) / (
            2 * h
        )
        (g2,) = torch.autograd.grad(obj(z, Y, step=2, total_steps=3).sum(), z)
        assert g2[0, k, 0, j].item() == pytest.approx(fd.item(), rel=1e-6)


def test_tsallis_ce_is_safe_near_and_at_q_1_and_on_saturated_logits():
    z = torch.tensor([[[[60.0, -60.0]], [[-60.0, 60.0]]]], requires_grad=True)
    y = torch.tensor([[[1, 1]]])  # pixel 0: p_y ~ e^-120, pixel 1: p_y ~ 1
    for q in (-2.0, 1.0 - 1e-7, 1.0, 1.5):
        obj = build_objective(dict(type='Tsallis-CE', q_start=q, q_end=q))
        out = obj(z, y)
        (grad,) = torch.autograd.grad(out.sum(), z)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), q
    near = build_objective(dict(type='Tsallis-CE', q_start=1 - 1e-7, q_end=1))
    assert near(Z, Y).item() == pytest.approx((_ce(0) + _ce(1)) / 2, rel=1e-5)
    with pytest.raises(ValueError, match='q_start must be a finite number'):
        build_objective(dict(type='Tsallis-CE', q_start=float('nan')))


def test_objectives_return_per_image_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 2, 5, generator=g, requires_grad=True)
    y = torch.randint(0, 4, (3, 2, 5), generator=g)
    for name in OBJECTIVE_NAMES:
        cfg = dict(type=name)
        if name == 'Mask-CE-Bal':
            cfg['class_weights'] = [0.1, 0.2, 0.3, 0.4]
        out = build_objective(cfg)(z, y, step=2, total_steps=4)
        assert out.shape == (3,), name
        (grad,) = torch.autograd.grad(out.sum(), z, retain_graph=True)
        assert torch.isfinite(grad).all(), name
        # image 0 only depends on the logits of image 0
        (grad0,) = torch.autograd.grad(out[0], z)
        assert grad0[1:].abs().sum() == 0, name


def test_class_weight_vectors_load():
    voc = load_class_weights('voc')
    assert voc.shape == (21,) and voc[0].item() == pytest.approx(0.0007)
    assert load_class_weights('VOC').shape == (21,)
    assert load_class_weights('ade20k').shape == (151,)
    assert torch.equal(load_class_weights([1, 2.5]), torch.tensor([1.0, 2.5]))
    assert BalancedMaskedCrossEntropy('voc').class_weights.shape == (21,)
    with pytest.raises(ValueError, match='voc'):
        load_class_weights('cityscapes')
    with pytest.raises(ValueError, match='non-negative'):
        load_class_weights([0.5, -1.0])


def test_class_weight_length_must_match_k():
    obj = build_objective(dict(type='Mask-CE-Bal', class_weights='voc'))
    with pytest.raises(ValueError, match='21 class weights.*K=3'):
        obj(Z, Y)


def test_mask_ce_bal_requires_class_weights():
    with pytest.raises(ValueError, match="class_weights='voc'"):
        build_objective('Mask-CE-Bal')


def test_class_weights_from_counts():
    labels = torch.tensor([[0, 0, 0, 1], [255, 1, 0, 0]])
    counts = count_label_pixels(labels, num_classes=3)
    assert counts.tolist() == [5, 2, 0]
    w = class_weights_from_counts(counts)
    assert w.sum().item() == pytest.approx(1.0)
    assert w.tolist() == pytest.approx([2 / 7, 5 / 7, 0.0])


def test_unknown_objective_lists_available_names():
    with pytest.raises(ValueError, match='Mask-CE.*JS-Avg') as err:
        build_objective('Mask-XE')
    assert "'Mask-XE'" in str(err.value)
    with pytest.raises(ValueError, match='available'):
        build_objective('PGD')  # an attack, not an objective


def test_bad_labels_are_reported():
    bad = Y.clone()
    bad[0, 0, 1] = 9
    with pytest.raises(ValueError, match=r'9.*K=3.*255'):
        build_objective('CE')(Z, bad)


def test_build_from_registry():
    obj = OBJECTIVES.build(dict(type='CosPGD', activation='sigmoid'))
    assert isinstance(obj, CosPGDLoss) and obj.activation == 'sigmoid'


@pytest.mark.parametrize('name', OBJECTIVE_NAMES)
def test_objectives_are_not_attacks(name):
    """Objectives live in ``OBJECTIVES``: ``ATTACKS`` does not build one, and
    says where it belongs; an attack's ``loss`` still takes the name."""
    assert ATTACKS.get(name) is None
    with pytest.raises(KeyError, match=f"'{name}' is an attack objective, not an"):
        ATTACKS.build(dict(type=name))
    cfg = dict(type=name)
    if name == 'Mask-CE-Bal':
        cfg['class_weights'] = 'voc'
    assert type(OBJECTIVES.build(cfg)) is OBJECTIVES.get(name)
    attack = ATTACKS.build(dict(type='APGD', eps=8, n_iter=2, loss=cfg))
    assert type(attack.objective) is OBJECTIVES.get(name)
    # and an attack is no objective
    assert OBJECTIVES.get('APGD') is None
