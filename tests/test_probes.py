"""The Square Attack and the opt-in probes of the attack outcome
(mmseg_robust/evaluation/probes.py, docs/flags.md): each probe raises its flag
on a model whose gradients point the wrong way and stays silent on models whose
gradients are honest."""

import pytest
import torch

from mmseg_robust.attacks import Square
from mmseg_robust.attacks.square import square_fraction
from mmseg_robust.evaluation.probes import (
    PROBES,
    gradient_free_probe,
    large_radius_probe,
    probe_settings,
)

pytestmark = pytest.mark.usefixtures('attack_one_thread')


def _flippable(attack_models, b=3, h=8, w=8, seed=0):
    """A per-pixel linear 2-class model: images near one base image, every
    pixel correct by a logit margin between 0.4 and 2.6, while an L-inf move
    of 32/255 changes the logit difference by up to 20 * 3 * 32/255 = 7.5:
    every pixel can be flipped at 4 x 8/255."""
    g = torch.Generator().manual_seed(seed)
    weights = 10.0 * torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    base = 0.3 + 0.4 * torch.rand(1, 3, h, w, generator=g)
    x = (base + 0.01 * torch.rand(b, 3, h, w, generator=g)).clamp(0, 1)
    label_map = torch.randint(0, 2, (h, w), generator=g)
    labels = label_map.expand(b, h, w).clone()
    # z0 - z1 = 20 * sum_c x_c + offset: margin 1 to 2 at the base image
    sign = torch.where(label_map == 0, 1.0, -1.0)
    margin = 1.0 + torch.rand(h, w, generator=g)
    offset = sign * margin - 20.0 * base.sum(1)[0]

    def model(images):
        z = torch.einsum('kc,bchw->bkhw', weights, images)
        return z + torch.stack([offset / 2, -offset / 2])[None]

    return model, x, labels


def _acc(pred, labels):
    return (pred == labels).float().mean((1, 2))


# ------------------------------------------------------------------- Square
def test_square_fraction_follows_the_papers_schedule():
    # 10,000 queries: halved after iterations 10, 50, 200, ... (App. C)
    assert square_fraction(0.8, 0, 10000) == 0.8
    assert square_fraction(0.8, 10, 10000) == 0.8
    assert square_fraction(0.8, 11, 10000) == 0.4
    assert square_fraction(0.8, 51, 10000) == 0.2
    assert square_fraction(0.8, 9999, 10000) == 0.8 / 2**9
    # rescaled to the budget: 1,000 queries halve after 1, 5, 20, ...
    assert square_fraction(0.8, 2, 1000) == 0.4


def test_square_stays_in_the_ball_lowers_accuracy_and_is_batch_independent(
    attack_models,
):
    model, x, y = _flippable(attack_models)
    attack = Square(eps=8, queries=60, eps_units='255')
    out = attack.run(model, x, y, seeds=[5, 6, 7])
    attack_models.assert_feasible(out.adv_images, x, 8, 'Linf')
    # only +-eps per channel (or the [0, 1] bound) inside the image
    delta = (out.adv_images - x) * 255
    assert torch.allclose(delta.abs(), torch.full_like(delta, 8.0), atol=1e-4)
    assert (_acc(out.adv_pred, y) < _acc(model(x).argmax(1), y)).all()
    # the prediction returned is the model's at the returned images
    assert torch.equal(out.adv_pred, model(out.adv_images).argmax(1))
    # an image gets the same attack alone as in its batch (its own seed)
    alone = attack.run(model, x[1:2], y[1:2], seeds=[6])
    assert torch.equal(alone.adv_images, out.adv_images[1:2])
    # and another seed gives another search
    other = attack.run(model, x[1:2], y[1:2], seeds=[8])
    assert not torch.equal(other.adv_images, alone.adv_images)


def test_square_accepts_only_improvements(attack_models):
    """More queries never end worse (the search keeps the best point)."""
    net = attack_models.tiny_net(scale=0.8)
    x, y = attack_models.batch(2, 16, 16, net=net)
    accs = [
        _acc(
            Square(eps=4, queries=q, eps_units='255')
            .run(net, x, y, seeds=[1, 2])
            .adv_pred,
            y,
        )
        for q in (0, 20, 80)
    ]
    assert (accs[1] <= accs[0]).all() and (accs[2] <= accs[1]).all()


def test_square_refuses_l2_and_bad_budgets():
    with pytest.raises(ValueError, match='L-inf threat model only'):
        Square(norm='L2')
    with pytest.raises(ValueError, match='queries'):
        Square(queries=-1)


# ------------------------------------------------------------------ probes
def test_probe_settings():
    assert probe_settings(None) == {} and probe_settings(False) == {}
    assert set(probe_settings(True)) == set(PROBES)
    assert probe_settings('large_radius') == dict(large_radius=PROBES['large_radius'])
    got = probe_settings(dict(gradient_free=dict(queries=50)))
    assert got['gradient_free']['queries'] == 50
    assert got['gradient_free']['images'] == PROBES['gradient_free']['images']
    with pytest.raises(ValueError, match='unknown probe'):
        probe_settings(['square'])
    with pytest.raises(ValueError, match='no setting'):
        probe_settings(dict(large_radius=dict(radius=3)))


def test_large_radius_probe_triggers_on_masked_gradients(attack_models):
    model, x, y = _flippable(attack_models)
    flag, details = large_radius_probe(model, x, y, None, [0, 1, 2], eps=8)
    assert flag is None, details
    assert details['radius'] == 32 and details['mean_accuracy'] <= 5.0
    flag, details = large_radius_probe(
        attack_models.MaskedGradients(model), x, y, None, [0, 1, 2], eps=8
    )
    assert flag.code == 'large_radius_probe' and flag.level == 'warning'
    assert details['mean_accuracy'] > details['max_accuracy']
    assert 'APGD-CE at 32/255' in flag.message


def test_gradient_free_probe_triggers_when_square_beats_the_white_box(attack_models):
    from mmseg_robust.attacks import APGD

    model, x, y = _flippable(attack_models)
    keys = ['a.png', 'b.png', 'c.png']
    for view, expect in (
        (model, None),
        (attack_models.MaskedGradients(model), 'gradient_free_probe'),
    ):
        white = APGD(eps=4, steps=20, eps_units='255').run(view, x, y, seeds=[0, 1, 2])
        white_box = (100 * _acc(white.adv_pred, y)).tolist()
        flag, details = gradient_free_probe(
            view, x, y, None, [0, 1, 2], 4, white_box, keys, queries=100
        )
        assert (flag.code if flag else None) == expect, details
    assert details['beaten'] and details['beaten'][0]['image'] in keys
    assert all(b['square'] < b['white_box'] - 2 for b in details['beaten'])


def test_square_reports_its_forwards(attack_models):
    """Queries + 2 forward passes per image (the stripes and the returned
    point), no forward+backward pass (docs/algorithms.md section 3.6)."""
    model, x, y = _flippable(attack_models)
    out = Square(eps=8, queries=7, eps_units='255').run(model, x, y, seeds=[0, 1, 2])
    assert out.stats['forwards'].tolist() == [9, 9, 9]
    assert out.stats['passes'].tolist() == [0, 0, 0]
