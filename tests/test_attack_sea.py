"""SEA, the Segmentation Ensemble Attack (docs/algorithms.md section 4)."""

import pytest
import torch

from mmseg_robust.attacks import (
    SEA,
    APGDLargeEps,
    BalancedMaskedCrossEntropy,
    JensenShannonDivergence,
    MaskedCrossEntropy,
    derive_seeds,
)
from mmseg_robust.registry import ATTACKS

pytestmark = pytest.mark.usefixtures('attack_one_thread')

SEEDS = [31, 32, 33, 34]
WEIGHTS = [0.1, 0.2, 0.3, 0.4]
EPS = {'Linf': 8, 'L2': 64}
NAMES = ['APGD-Mask-CE-Bal', 'APGD-Mask-CE', 'APGD-JS-Avg']


@pytest.fixture
def problem(attack_models):
    net = attack_models.tiny_net()
    x, y = attack_models.batch(net=net)
    return net, x, y


def _sea(eps=8, norm='Linf', **kw):
    return SEA(eps=eps, n_iter=10, norm=norm, class_weights=WEIGHTS, **kw)


def test_three_losses_in_order():
    sea = _sea()
    assert list(sea.attacks) == NAMES
    kinds = [type(a.objective) for a in sea.attacks.values()]
    assert kinds == [
        BalancedMaskedCrossEntropy,
        MaskedCrossEntropy,
        JensenShannonDivergence,
    ]
    for attack in sea.attacks.values():
        assert isinstance(attack, APGDLargeEps)
        assert attack.stages == [(3, 16.0), (3, 12.0), (4, 8.0)]
    assert sea.attacks[NAMES[0]].objective.class_weights.tolist() == pytest.approx(
        WEIGHTS
    )


def test_build_from_registry(problem):
    net, x, y = problem
    sea = ATTACKS.build(dict(type='SEA', eps=8, n_iter=12, class_weights=WEIGHTS))
    assert isinstance(sea, SEA) and list(sea.attacks) == NAMES
    assert sea(net, x, y).shape == x.shape
    voc = ATTACKS.build(dict(type='SEA', eps=4, n_iter=300, class_weights='voc'))
    assert voc.attacks[NAMES[0]].stages == [(90, 8.0), (90, 6.0), (120, 4.0)]


def test_mask_ce_bal_without_class_weights_says_what_to_pass():
    with pytest.raises(ValueError, match="class_weights='voc' \\| 'ade20k'"):
        SEA(eps=8, n_iter=10)
    # fine without Mask-CE-Bal, or with weights inside the loss config
    assert (
        list(SEA(eps=8, n_iter=10, losses=('Mask-CE', 'JS-Avg')).attacks) == NAMES[1:]
    )
    sea = SEA(eps=8, n_iter=10, losses=(dict(type='Mask-CE-Bal', class_weights='voc'),))
    assert sea.attacks['APGD-Mask-CE-Bal'].objective.class_weights.numel() == 21


def test_class_weight_length_mismatch(problem):
    net, x, y = problem
    with pytest.raises(ValueError, match='21 class weights.*K=4'):
        SEA(eps=8, n_iter=3, class_weights='voc')(net, x, y)


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_worst_case_per_image(norm, problem, attack_models):
    net, x, y = problem
    sea = _sea(EPS[norm], norm)
    outs = sea.run(net, x, y, seeds=SEEDS).members
    assert list(outs) == NAMES
    worst = sea.run(net, x, y, seeds=SEEDS)
    attack_models.assert_feasible(worst.adv_images, x, EPS[norm], norm)
    assert torch.equal(worst.adv_pred, net(worst.adv_images).argmax(1))
    accs = torch.stack([(o.adv_pred == y).float().mean((1, 2)) for o in outs.values()])
    acc = (worst.adv_pred == y).float().mean((1, 2))
    assert (acc <= accs).all()  # no single attack is stronger on any image
    assert torch.equal(acc, accs.min(0).values)
    assert (acc <= (net(x).argmax(1) == y).float().mean((1, 2))).all()
    # each image's output is the one of the (first) attack achieving its minimum
    for i in range(len(x)):
        a = int(torch.nonzero(accs[:, i] == acc[i])[0])
        chosen = list(outs.values())[a]
        assert torch.equal(worst.adv_images[i], chosen.adv_images[i])
        assert torch.equal(worst.adv_pred[i], chosen.adv_pred[i])
    for o in outs.values():
        attack_models.assert_feasible(o.adv_images, x, EPS[norm], norm)


def test_ties_go_to_the_earlier_attack(problem):
    net, x, y = problem
    sea = _sea(eps=0.5)  # 0.5/255, too small to change many predictions: ties
    outs = list(sea.run(net, x, y, seeds=SEEDS).members.values())
    worst = sea.run(net, x, y, seeds=SEEDS)
    accs = torch.stack([(o.adv_pred == y).float().mean((1, 2)) for o in outs])
    tied = (accs == accs[0]).all(0)
    assert tied.any()
    differ = tied & (outs[0].adv_images != outs[1].adv_images).flatten(1).any(1)
    assert differ.any()  # the choice matters
    assert torch.equal(worst.adv_images[tied], outs[0].adv_images[tied])


def test_attacks_are_independent_runs_from_the_clean_input(problem):
    net, x, y = problem
    sea = _sea()
    outs = sea.run(net, x, y, seeds=SEEDS).members
    for a, (name, attack) in enumerate(sea.attacks.items()):
        alone = attack.run(net, x, y, seeds=derive_seeds(SEEDS, a))
        assert torch.equal(alone.adv_images, outs[name].adv_images), name
        assert torch.equal(alone.adv_pred, outs[name].adv_pred), name


def test_derived_seeds_are_deterministic_and_distinct():
    a = derive_seeds([1, 2, 3], 0)
    assert a == derive_seeds([1, 2, 3], 0)
    assert a[1:] == derive_seeds([2, 3], 0)  # per image, not per batch
    assert len({*a, *derive_seeds([1, 2, 3], 1)}) == 6
    assert all(0 <= s < 2**63 for s in a)
    assert derive_seeds(None, 0) is None


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_seeds_reproducible_and_batch_independent(norm, problem):
    net, x, y = problem
    sea = _sea(EPS[norm], norm)
    full = sea.run(net, x, y, seeds=SEEDS)
    again = sea.run(net, x, y, seeds=SEEDS)
    assert torch.equal(full.adv_images, again.adv_images)
    a = sea.run(net, x[:2], y[:2], seeds=SEEDS[:2])
    b = sea.run(net, x[2:], y[2:], seeds=SEEDS[2:])
    assert torch.equal(full.adv_images, torch.cat([a.adv_images, b.adv_images]))
    assert torch.equal(full.adv_pred, torch.cat([a.adv_pred, b.adv_pred]))


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_eps_zero_returns_clean_images_and_predictions(norm, problem):
    net, x, y = problem
    sea = _sea(0, norm)
    for out in (sea.run(net, x, y), *sea.run(net, x, y).members.values()):
        assert torch.equal(out.adv_images, x)
        assert torch.equal(out.adv_pred, net(x).argmax(1))


def test_pixels_that_do_not_count_do_not_change_the_result(problem):
    net, x, y = problem
    sea = _sea()
    y_ign = y.clone()
    y_ign[:, :2, :] = 255
    valid = torch.ones_like(y, dtype=torch.bool)
    valid[:, :, -3:] = False
    ref = sea.run(net, x, y_ign, valid, seeds=SEEDS)
    y_pad = y_ign.clone()
    y_pad[:, :, -3:] = 77
    y_zero = y_ign.clone()
    y_zero[:, :2, :] = 0
    for labels, mask in ((y_pad, valid), (y_zero, valid & (y_ign != 255))):
        other = sea.run(net, x, labels, mask, seeds=SEEDS)
        assert torch.equal(other.adv_images, ref.adv_images)


def test_cost_about_n_iter_passes_per_attack(attack_models, problem):
    net, x, y = problem
    rec = attack_models.Recorder(net)
    SEA(eps=8, n_iter=10, class_weights=WEIGHTS, early_stop=False)(rec, x, y)
    assert rec.n_backward == 3 * 10
    # per stage n_i + 1 iterates, then one forward for the returned prediction;
    # SEA's own statistics: one forward at the clean and one at the worst case
    assert rec.n_forward == 3 * (10 + 3 + 1) + 2


def test_apgd_options_reach_every_member(problem):
    default = _sea()  # DEFAULT_MODES
    assert (default.compat, default.zero_acc, default.first_window) == (
        None,
        'leave',
        'reference',
    )
    for kw in (
        dict(compat='reference'),
        dict(zero_acc='reference', first_window='reference'),
    ):
        sea = _sea(**kw, early_stop=False)
        assert (sea.compat, sea.zero_acc, sea.first_window) == ('reference',) * 3
        for member in sea.attacks.values():
            assert (member.zero_acc, member.first_window) == ('reference',) * 2
            assert member.early_stop is False
    one = _sea(zero_acc='leave')
    for member in one.attacks.values():
        assert (member.zero_acc, member.first_window) == ('leave', 'reference')
    with pytest.raises(ValueError, match="compat='reference' sets first_window"):
        _sea(compat='reference', first_window='paper')
    # the members run with the options: SEA's members equal APGDLargeEps alone
    net, x, y = problem
    sea = _sea(compat='reference')
    outs = sea.run(net, x, y, seeds=SEEDS).members
    for a, (name, attack) in enumerate(sea.attacks.items()):
        alone = APGDLargeEps(
            eps=8, n_iter=10, loss=attack.objective, compat='reference'
        ).run(net, x, y, seeds=derive_seeds(SEEDS, a))
        assert torch.equal(alone.adv_images, outs[name].adv_images), name


def test_stall_stop_reaches_every_member_and_keeps_seeds_batch_independent(
    problem,
):
    assert _sea().stall_stop is False
    assert all(not m.stall_stop for m in _sea().attacks.values())
    sea = SEA(eps=8, n_iter=40, class_weights=WEIGHTS, stall_stop=True)
    assert 'stall_stop=True' in repr(sea)
    assert all(m.stall_stop for m in sea.attacks.values())
    with pytest.raises(ValueError, match="^SEA: stall_stop needs zero_acc='leave'"):
        _sea(stall_stop=True, compat='reference')
    net, x, y = problem
    full = sea.run(net, x, y, seeds=SEEDS)
    a = sea.run(net, x[:1], y[:1], seeds=SEEDS[:1])
    b = sea.run(net, x[1:], y[1:], seeds=SEEDS[1:])
    assert torch.equal(full.adv_images, torch.cat([a.adv_images, b.adv_images]))
    assert torch.equal(full.adv_pred, torch.cat([a.adv_pred, b.adv_pred]))


# ------------------------------------------------------------- refinement
def _alone(attack_models, net, x, y, i, objective, start, eps, steps):
    """The refinement's oracle for image ``i``: one APGD run on that image
    alone, from ``start``, at the full radius, with ``objective``."""
    from mmseg_robust.attacks.apgd import apgd_run
    from mmseg_robust.attacks.base import SegmentationTarget
    from mmseg_robust.attacks.threat_model import ThreatModel

    target = SegmentationTarget(net, y[i : i + 1], None, 255, [objective])
    with torch.enable_grad():
        out = apgd_run(
            target,
            objective,
            ThreatModel(eps, 'Linf', eps_units='255'),
            x[i : i + 1],
            start[i : i + 1],
            eps / 255.0,
            steps,
        )
    return out.adv_images[0], out.adv_pred[0]


@pytest.fixture
def mixed(attack_models):
    """6 images of 4 x 4 whose worst members differ (at eps 8 and 16), the
    last one at accuracy 0 from the start (its correct pixels ignored)."""
    net = attack_models.tiny_net()
    x, y = attack_models.batch(6, 4, 4, net=net, seed=1)
    wrong = net(x[5:]).argmax(1) != y[5:]
    assert wrong.any()
    y[5:] = torch.where(wrong, y[5:], 255)
    return net, x, y


@pytest.mark.parametrize('eps', [8, 16])
def test_refine_continues_each_image_from_its_worst_case(eps, mixed, attack_models):
    """refine_steps: the members are SEA's own (same seeds), then per image not
    at accuracy 0 one APGD run of refine_steps iterations at the full radius
    from its worst case, with its worst member's loss, as on the image alone;
    images at accuracy 0 keep their point; the result is the worst case over
    the members and the refinement."""
    net, x, y = mixed
    seeds = list(range(6))
    plain = _sea(eps=eps).run(net, x, y, seeds=seeds)
    sea = _sea(eps=eps, refine_steps=6)
    out = sea.run(net, x, y, seeds=seeds)
    assert sea.record_names() == NAMES + ['Refine'] and list(out.members) == (
        NAMES + ['Refine']
    )
    for name in NAMES:
        assert torch.equal(out.members[name].adv_images, plain.members[name].adv_images)
    refine = out.members['Refine']
    objectives = [a.objective for a in sea.attacks.values()]
    valid = y != 255
    refined = set()
    for i in range(x.shape[0]):
        start = plain.adv_images
        correct = int(((plain.adv_pred[i] == y[i]) & valid[i]).sum())
        if correct == 0:  # accuracy 0: kept, no pass spent
            assert torch.equal(refine.adv_images[i], start[i])
            assert int(refine.stats['passes'][i]) == 0
            continue
        member = int(plain.worst_member[i])
        refined.add(member)
        adv_i, pred_i = _alone(
            attack_models, net, x, y, i, objectives[member], start, eps, 6
        )
        assert torch.allclose(refine.adv_images[i], adv_i, atol=1e-6)
        assert torch.equal(refine.adv_pred[i], pred_i)
        # 6 iterations: 6 backward passes on the image; no more accuracy than
        # its start
        assert int(refine.stats['passes'][i]) == 6
        assert int(((refine.adv_pred[i] == y[i]) & valid[i]).sum()) <= correct
    # the runs are grouped by member: more than one group, and an image left out
    assert len(refined) > 1 and int(refine.stats['passes'][5]) == 0
    attack_models.assert_feasible(out.adv_images, x, eps, 'Linf')
    correct = torch.stack(
        [((o.adv_pred == y) & valid).flatten(1).sum(1) for o in out.members.values()]
    )
    assert torch.equal(out.worst_member, correct.argmin(0))
    assert torch.equal(
        out.stats['passes'],
        sum(o.stats['passes'] for o in out.members.values()),
    )


def test_refine_is_batch_independent(mixed):
    net, x, y = mixed
    sea = _sea(eps=16, refine_steps=5)
    seeds = list(range(6))
    full = sea.run(net, x, y, seeds=seeds)
    for i in range(x.shape[0]):
        one = sea.run(net, x[i : i + 1], y[i : i + 1], seeds=seeds[i : i + 1])
        assert torch.allclose(one.adv_images[0], full.adv_images[i], atol=1e-6)
        assert torch.equal(
            one.members['Refine'].adv_pred[0], full.members['Refine'].adv_pred[i]
        )


def test_refine_names_and_bad_values():
    assert _sea(refine_steps=3, name='SEA-R').record_names()[-1] == 'SEA-R:Refine'
    assert 'refine_steps=3' in repr(_sea(refine_steps=3))
    assert _sea().record_names() == NAMES
    for bad in (-1, 2.5, True):
        with pytest.raises((TypeError, ValueError), match='refine_steps'):
            _sea(refine_steps=bad)
    with pytest.raises(ValueError, match="compat='reference'"):
        _sea(refine_steps=3, compat='reference')


def test_refine_steps_is_an_evaluator_option_of_sea(repo_root):
    import os.path as osp

    from mmengine.config import Config

    from mmseg_robust.engine import apply_robustness_evaluator

    path = osp.join(repo_root, 'configs/synthetic/upernet_convnext-micro_synthetic.py')
    cfg = Config.fromfile(path)
    spec = dict(type='SEA', steps=250, refine_steps=150, class_weights=WEIGHTS)
    apply_robustness_evaluator(cfg, spec)
    attack = cfg.test_cfg.attacks[0]
    assert (attack['steps'], attack['refine_steps']) == (250, 150)
    sea = ATTACKS.build(dict(attack, eps=8, eps_units='255'))
    assert sea.record_names()[-1] == 'Refine' and sea.refine_steps == 150
    with pytest.raises(ValueError, match='refine_steps is an option of SEA'):
        apply_robustness_evaluator(
            Config.fromfile(path), dict(type='PGD', refine_steps=10)
        )
