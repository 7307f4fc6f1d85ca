"""The adv-lib minimal-norm attacks (docs/algorithms.md section 3.5) on a tiny
model: the radius reported is the norm of the returned perturbation, the
pixels reported flipped are flipped at the returned images, the robust
accuracy against eps follows from the radii, the pass counts are the real
ones, and without adv-lib a clear ImportError."""

import sys

import pytest
import torch

from mmseg_robust.attacks import DAG, PDPGD, ALMAProx, import_adv_lib
from mmseg_robust.registry import ATTACKS

pytestmark = pytest.mark.usefixtures('attack_one_thread')

ATTACKS_UNDER_TEST = [
    lambda: ALMAProx(steps=20, adv_threshold=0.6, compile=False),
    lambda: PDPGD(steps=20, adv_threshold=0.6),
    lambda: PDPGD(norm='L2', steps=20, adv_threshold=0.6),
    lambda: DAG(steps=30, gamma=0.01, adv_threshold=0.6),
    lambda: DAG(norm='L2', steps=30, gamma=0.5, adv_threshold=0.6),
]
IDS = ['ALMAProx', 'PDPGD-Linf', 'PDPGD-L2', 'DAG-Linf', 'DAG-L2']


@pytest.fixture
def problem(attack_models):
    pytest.importorskip('adv_lib', reason="needs pip install 'mmseg_robust[adv-lib]'")
    net = attack_models.tiny_net(scale=1.5, seed=0)
    x, y = attack_models.batch(b=3, net=net)
    return net, x, y


@pytest.mark.parametrize('make', ATTACKS_UNDER_TEST, ids=IDS)
def test_radius_is_the_norm_and_the_claimed_pixels_are_flipped(
    make, problem, attack_models
):
    net, x, y = problem
    attack = make()
    view = attack_models.ImageCounter(net, x)
    found = attack.minimal(view, x, y)
    adv = found.adv_images
    assert adv.min() >= 0 and adv.max() <= 1  # in the pixel range
    delta = (adv - x).flatten(1).double()
    norm = delta.abs().amax(1) if attack.norm == 'Linf' else delta.norm(dim=1)
    assert torch.allclose(found.radius.double(), 255 * norm, rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        clean_ok = net(x).argmax(1) == y
        adv_pred = net(adv).argmax(1)
    assert torch.equal(found.adv_pred, adv_pred)
    assert torch.equal(found.flipped, clean_ok & (adv_pred != y))
    assert found.flipped.any()  # the attack flipped something to check
    wrong = (adv_pred != y).sum((1, 2))
    assert torch.equal(found.success, wrong >= 0.6 * y[0].numel())
    # the passes are the ones the model saw (DAG: image by image, each
    # image stops at its first adversarial iterate)
    assert found.stats['passes'].tolist() == view.passes.tolist()
    assert found.stats['forwards'].tolist() == view.forwards.tolist()
    if isinstance(attack, DAG):
        assert (view.passes <= attack.steps).all()
    else:
        assert view.passes.tolist() == [attack.steps] * 3


@pytest.mark.parametrize('make', ATTACKS_UNDER_TEST[1:3], ids=IDS[1:3])
def test_robust_accuracy_against_eps_and_the_attack_at_eps(
    make, problem, attack_models
):
    net, x, y = problem
    attack = make()
    found = attack.minimal(net, x, y)
    with torch.no_grad():
        clean_ok = (net(x).argmax(1) == y).sum((1, 2))
        adv_ok = (net(found.adv_images).argmax(1) == y).sum((1, 2))
    radii = sorted(found.radius.tolist())
    n = y.numel()
    curve = found.robust_accuracy([0.5 * radii[0], radii[1], radii[2]])
    inside = found.radius <= radii[1]
    by_hand = torch.where(inside, torch.minimum(adv_ok, clean_ok), clean_ok)
    assert list(curve.values()) == pytest.approx(
        [
            float(clean_ok.sum()) / n,
            float(by_hand.sum()) / n,
            float(torch.minimum(adv_ok, clean_ok).sum()) / n,
        ]
    )
    # as an attack at eps: the minimal-norm point inside the ball, else clean
    at_eps = ATTACKS.build(
        dict(type=type(attack).__name__, eps=radii[1], norm=attack.norm, steps=20)
        | dict(adv_threshold=0.6)
    )
    out = at_eps.run(net, x, y)
    expected = torch.where(inside.view(-1, 1, 1, 1), found.adv_images, x)
    assert torch.equal(out.adv_images, expected)
    assert torch.equal(out.stats['radius'], found.radius)
    attack_models.assert_feasible(out.adv_images, x, radii[1], attack.norm, tol=1e-5)
    assert torch.equal(out.adv_pred, net(out.adv_images).argmax(1))


def test_arguments_are_checked():
    with pytest.raises(ValueError, match='Linf norm'):
        ALMAProx(norm='L2')
    with pytest.raises(ValueError, match='adv_threshold'):
        PDPGD(adv_threshold=0)
    with pytest.raises(ValueError, match='gamma'):
        DAG(gamma=0)
    # the settings are in the repr (the result cache's fingerprint)
    assert 'gamma=0.01' in repr(DAG(gamma=0.01, options=dict(p=2)))
    assert "options={'p': 2}" in repr(DAG(gamma=0.01, options=dict(p=2)))


def test_unknown_options_name_the_arguments(problem):
    net, x, y = problem
    with pytest.raises(ValueError, match="options \\['lr'\\].*primal_lr"):
        PDPGD(steps=2, options=dict(lr=0.1)).minimal(net, x, y)


def test_without_adv_lib_a_clear_import_error(monkeypatch, attack_models):
    for name in list(sys.modules):
        if name == 'adv_lib' or name.startswith('adv_lib.'):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'adv_lib', None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'mmseg_robust\[adv-lib\]'"):
        import_adv_lib()
    net = attack_models.tiny_net()
    x, y = attack_models.batch(b=1, net=net)
    attack = ATTACKS.build(dict(type='PDPGD', eps=8, steps=2))  # builds without it
    with pytest.raises(ImportError, match='adv-lib'):
        attack.run(net, x, y)
