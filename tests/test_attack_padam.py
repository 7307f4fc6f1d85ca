"""PAdam (docs/algorithms.md section 3.4) against a hand-written projected
Adam-AMSGrad loop, the first Adam step by hand, and Tsallis-CE as the loss of
PGD, APGD, SEA and PAdam."""

import pytest
import torch
import torch.nn.functional as F

from mmseg_robust.attacks import PAdam, ThreatModel
from mmseg_robust.registry import ATTACKS

pytestmark = pytest.mark.usefixtures('attack_one_thread')


def _by_hand(model, x, y, eps, norm, steps, lr, start):
    """torch.optim.Adam(amsgrad=True, maximize=True) on the perturbation of the
    per-image CE (sum over pixels / (H*W)), then the projection onto the ball
    and [0, 1]; the iterates and their pixel accuracies."""
    tm = ThreatModel(eps, norm)
    point = start.clone()
    delta = point - x
    adam = torch.optim.Adam([delta], lr=lr / 255, amsgrad=True, maximize=True)
    iterates = []
    for _ in range(steps):
        p = point.clone().requires_grad_(True)
        logits = model(p)
        loss = F.cross_entropy(logits, y, reduction='none').sum() / y[0].numel()
        (delta.grad,) = torch.autograd.grad(loss, p)
        iterates.append((point, (logits.argmax(1) == y).sum((1, 2))))
        adam.step()
        with torch.no_grad():
            point = tm.project(x + delta, x)
            delta.copy_(point - x)
    with torch.no_grad():
        iterates.append((point, (model(point).argmax(1) == y).sum((1, 2))))
    return iterates


def _best(iterates):
    """Per image the lowest-accuracy iterate (ties: the newer one, but the
    first accuracy-0 one is kept), as PGD's best_iterate."""
    best_x, best_n = iterates[0]
    for point, n in iterates[1:]:
        upd = (n < best_n) | ((n == best_n) & (best_n > 0))
        best_x = torch.where(upd.view(-1, 1, 1, 1), point, best_x)
        best_n = torch.where(upd, n, best_n)
    return best_x


@pytest.mark.parametrize('norm,eps', [('Linf', 8), ('L2', 64)])
@pytest.mark.parametrize('random_start', [False, True])
def test_padam_equals_a_hand_written_adam_amsgrad_loop(
    norm, eps, random_start, attack_models
):
    net = attack_models.tiny_net(scale=1.2)
    x, y = attack_models.batch(b=3, net=net)
    seeds = [4, 5, 6]
    start = ThreatModel(eps, norm).random_start(x, seeds=seeds) if random_start else x
    attack = PAdam(eps=eps, norm=norm, steps=5, random_start=random_start)
    out = attack.run(net, x, y, seeds=seeds)
    iterates = _by_hand(net, x, y, eps, norm, 5, 2.0, start)
    assert torch.equal(out.adv_images, _best(iterates))
    assert torch.equal(out.adv_pred, net(out.adv_images).argmax(1))
    attack_models.assert_feasible(out.adv_images, x, eps, norm)
    # the loop moved: the iterates are not all the start
    assert not torch.equal(iterates[-1][0], start)


def test_first_padam_step_is_lr_times_the_gradient_sign(attack_models):
    """Adam's first step is ``lr * m1_hat / (sqrt(v1_hat) + 1e-8)`` with
    ``m1_hat = g`` and ``v1_hat = g^2``: ``lr * g / (|g| + 1e-8)``, the sign
    step of size lr wherever ``|g| >> 1e-8`` (the oracle's linear model has
    a constant gradient); then the L-inf box."""
    o = attack_models.oracle()
    o.model.eval()
    attack = PAdam(eps=4, steps=1, lr=1.5, random_start=False)
    x_adv = attack.run(o.model, o.x, o.y).adv_images
    expected = (o.x + 1.5 / 255 * (o.linf_optimum(4) - o.x).sign()).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-6)
    # more steps: every coordinate ends at the vertex of the box
    x_adv = PAdam(eps=4, steps=6, lr=1.5, random_start=False).run(o.model, o.x, o.y)
    assert torch.allclose(x_adv.adv_images, o.linf_optimum(4), atol=1e-6)


def test_padam_checks_its_arguments():
    with pytest.raises(ValueError, match='lr must be > 0'):
        PAdam(lr=0)
    with pytest.raises(ValueError, match='betas'):
        PAdam(betas=(0.9, 1.0))
    assert ATTACKS.build(dict(type='PAdam', eps=8, steps=2)).name == 'PAdam-CE'


@pytest.mark.parametrize(
    'cfg',
    [
        dict(type='PGD', steps=3),
        dict(type='APGD', steps=3),
        dict(type='PAdam', steps=3),
        dict(type='SEA', steps=4, losses=('Tsallis-CE', 'Mask-CE')),
    ],
    ids=lambda c: c['type'],
)
def test_tsallis_ce_is_a_loss_of_every_attack(cfg, attack_models):
    """``loss='Tsallis-CE'`` (SEA: in ``losses``) runs, and at its first step
    PGD's update follows the Tsallis-CE gradient at q = -2, not the CE's."""
    net = attack_models.tiny_net()
    x, y = attack_models.batch(b=2, net=net)
    if cfg['type'] != 'SEA':
        cfg = dict(cfg, loss='Tsallis-CE')
    attack = ATTACKS.build(dict(cfg, eps=8))
    out = attack.run(net, x, y, seeds=[1, 2])
    attack_models.assert_feasible(out.adv_images, x, 8, 'Linf')
    if cfg['type'] == 'SEA':
        assert list(out.members) == ['APGD-Tsallis-CE', 'APGD-Mask-CE']
        return
    assert attack.name == f'{cfg["type"]}-Tsallis-CE'
    if cfg['type'] == 'PGD':
        one = ATTACKS.build(
            dict(type='PGD', eps=8, steps=1, random_start=False, loss='Tsallis-CE')
        )
        p = x.clone().requires_grad_(True)
        prob = F.softmax(net(p), 1).gather(1, y[:, None])
        (g,) = torch.autograd.grad(((1 - prob**3) / 3).sum(), p)
        expected = (x + 8 / 255 * g.sign()).clamp(0, 1)
        assert torch.allclose(one.run(net, x, y).adv_images, expected, atol=1e-7)
