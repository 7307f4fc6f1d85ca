"""APGD and the progressive radius schedule (docs/algorithms.md sections 3.2, 3.3)."""

import pytest
import torch

from mmseg_robust.attacks import (
    APGD,
    SEA,
    APGDLargeEps,
    APGDStepSizeControl,
    apgd_checkpoints,
    radius_schedule,
    step_size_halving,
)
from mmseg_robust.attacks.apgd import (
    DEFAULT_MODES,
    STALL_HALVINGS,
    APGDModes,
    apgd_run,
    resolve_modes,
    stall_patience,
)
from mmseg_robust.attacks.base import SegmentationTarget
from mmseg_robust.attacks.objectives import CrossEntropy
from mmseg_robust.registry import ATTACKS

pytestmark = pytest.mark.usefixtures('attack_one_thread')

SEEDS = [21, 22, 23, 24]
EPS = {'Linf': 8, 'L2': 64}
MAKERS = {
    'APGD': lambda eps, norm, **kw: APGD(eps=eps, norm=norm, n_iter=10, **kw),
    'APGDLargeEps': lambda eps, norm, **kw: APGDLargeEps(
        eps=eps, norm=norm, n_iter=12, **kw
    ),
}


class Wander(CrossEntropy):
    """An objective unrelated to accuracy, so the iterates' accuracy goes up and
    down and the lowest-accuracy iterate is not simply the last one."""

    def pixel_loss(self, s):
        r = torch.linspace(-1, 1, s.logits.shape[1]).view(1, -1, 1, 1)
        return (s.logits * r).sum(1)


@pytest.fixture
def problem(attack_models):
    net = attack_models.tiny_net()
    x, y = attack_models.batch(net=net)
    return net, x, y


def _lowest_accuracy_pick(accs, newest_at_zero=False):
    """Index of the returned iterate: lowest accuracy, ties -> newer, but the first
    iterate with accuracy 0 is kept unless ``newest_at_zero``."""
    best, pick = None, None
    for t, acc in enumerate(accs):
        newer_wins = best is not None and acc == best and (best > 0 or newest_at_zero)
        if best is None or acc < best or newer_wins:
            best, pick = acc, t
    return pick


# -------------------------------------------------------------------- schedule
def test_checkpoints():
    assert apgd_checkpoints(90) == [18, 35, 50, 63, 74, 83]
    assert apgd_checkpoints(120) == [25, 48, 68, 85, 99, 110, 118]
    assert apgd_checkpoints(100) == [21, 40, 56, 69, 79, 86, 92, 98]
    assert apgd_checkpoints(10) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert apgd_checkpoints(5) == [0, 1, 2, 3, 4]
    assert apgd_checkpoints(1) == [0]
    assert apgd_checkpoints(0) == []


def test_radius_schedule():
    assert radius_schedule(300, 8) == [(90, 16.0), (90, 12.0), (120, 8.0)]
    assert radius_schedule(12, 4) == [(3, 8.0), (3, 6.0), (6, 4.0)]
    assert radius_schedule(10, 4) == [(3, 8.0), (3, 6.0), (4, 4.0)]
    assert APGDLargeEps(eps=4, n_iter=300).stages == [(90, 8.0), (90, 6.0), (120, 4.0)]
    with pytest.raises(ValueError, match='last radius factor'):
        radius_schedule(300, 8, radius_factors=(2.0, 1.5), iter_fractions=(0.3,))
    with pytest.raises(ValueError, match='one iteration fraction per stage'):
        radius_schedule(300, 8, radius_factors=(2.0, 1.0), iter_fractions=(0.3, 0.3))


def test_step_size_halving_conditions():
    t = torch.tensor
    # (a): increases <= 0.75 * window
    a = step_size_halving(
        t([15.0, 16.0, 12.0]),
        20,
        t([1.0, 1.0, 1.0]),
        t([0.0, 0.0, 0.0]),
        t([True, True, True]),
    )
    assert a.tolist() == [True, False, True]
    # (b): not halved at the last check and the best CE did not improve
    b = step_size_halving(
        t([20.0, 20.0, 20.0, 20.0]),
        20,
        t([1.0, 1.0, 2.0, 1.0]),
        t([1.0, 1.0, 1.0, 2.0]),
        t([False, True, False, False]),
    )
    assert b.tolist() == [True, False, False, True]


def test_step_size_control_on_constructed_ce_traces():
    n = 90
    checks = apgd_checkpoints(n)
    ce = torch.zeros(n, 3)
    # image 0: CE increases every iteration -> never halved
    ce[:, 0] = torch.arange(1, n + 1, dtype=torch.float)
    # image 1: constant CE -> no increase -> (a) at every checkpoint
    ce[:, 1] = 1.0
    # image 2: a high first iterate, then a saw-tooth below it: many increases but
    # the best CE never improves -> (b) fires at every other checkpoint, starting
    # at the second ((b) cannot fire at the first checkpoint)
    saw = 0.5 + 0.01 * (torch.arange(n) % 10).float()
    saw[0] = 5.0
    ce[:, 2] = saw
    eta0 = 2 * 8 / 255
    ctl = APGDStepSizeControl(n, torch.zeros(3), eta0)
    # image 3: starts at its best CE (10), then a rising saw-tooth below it: (b)
    # must not fire at the first checkpoint (no previous one), then alternates
    start_high = APGDStepSizeControl(n, torch.tensor([10.0]), eta0)
    halvings = []
    for i in range(n):
        improved, halved = ctl.update(i, ce[i])
        assert (halved is not None) == (i in checks)
        if i == 0:
            assert improved.tolist() == [True, True, True]
        _, halved_high = start_high.update(i, saw[i : i + 1].clamp(max=0.9))
        if halved is not None:
            halvings.append(halved.tolist() + halved_high.tolist())
    assert [h[0] for h in halvings] == [False] * 6
    assert [h[1] for h in halvings] == [True] * 6
    assert [h[2] for h in halvings] == [False, True, False, True, False, True]
    assert [h[3] for h in halvings] == [False, True, False, True, False, True]
    assert ctl.eta.tolist() == pytest.approx([eta0, eta0 / 64, eta0 / 8])
    assert ctl.ce_best.tolist() == [90.0, 1.0, 5.0]


# ------------------------------------------------------------------ invariants
@pytest.mark.parametrize('norm', ['Linf', 'L2'])
@pytest.mark.parametrize('name', list(MAKERS))
def test_invariants(name, norm, problem, attack_models):
    net, x, y = problem
    eps = EPS[norm]
    attack = MAKERS[name](eps, norm)
    out = attack.run(net, x, y, seeds=SEEDS)
    attack_models.assert_feasible(out.adv_images, x, eps, norm)
    assert torch.equal(out.adv_pred, net(out.adv_images).argmax(1))
    clean = (net(x).argmax(1) == y).float().mean((1, 2))
    robust = (out.adv_pred == y).float().mean((1, 2))
    assert (robust <= clean).all() and (robust < clean).any()
    again = attack.run(net, x, y, seeds=SEEDS)
    assert torch.equal(again.adv_images, out.adv_images)
    assert torch.equal(again.adv_pred, out.adv_pred)
    # per-image seeds: independent of batch composition
    a = attack.run(net, x[:2], y[:2], seeds=SEEDS[:2])
    b = attack.run(net, x[2:], y[2:], seeds=SEEDS[2:])
    assert torch.equal(torch.cat([a.adv_images, b.adv_images]), out.adv_images)
    assert torch.equal(torch.cat([a.adv_pred, b.adv_pred]), out.adv_pred)


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
@pytest.mark.parametrize('name', list(MAKERS))
def test_eps_zero_returns_clean_images_and_predictions(name, norm, problem):
    net, x, y = problem
    for early_stop in (True, False):
        out = MAKERS[name](0, norm, early_stop=early_stop).run(net, x, y)
        assert torch.equal(out.adv_images, x)
        assert torch.equal(out.adv_pred, net(x).argmax(1))


@pytest.mark.parametrize('name', list(MAKERS))
def test_pixels_that_do_not_count_do_not_change_the_result(name, problem):
    net, x, y = problem
    attack = MAKERS[name](8, 'Linf')
    y_ign = y.clone()
    y_ign[:, :2, :] = 255
    valid = torch.ones_like(y, dtype=torch.bool)
    valid[:, :, -3:] = False
    ref = attack.run(net, x, y_ign, valid, seeds=SEEDS)
    y_pad = y_ign.clone()
    y_pad[:, :, -3:] = 77
    y_zero = y_ign.clone()
    y_zero[:, :2, :] = 0
    for labels, mask in ((y_pad, valid), (y_zero, valid & (y_ign != 255))):
        other = attack.run(net, x, labels, mask, seeds=SEEDS)
        assert torch.equal(other.adv_images, ref.adv_images)
        assert torch.equal(other.adv_pred, ref.adv_pred)
    assert not torch.equal(attack(net, x, y, seeds=SEEDS), ref.adv_images)


def test_ignored_pixels_stay_at_the_starting_point(attack_models):
    o = attack_models.oracle(b=2, h=3, w=4)
    y = o.y.clone()
    y[0, 1, :] = 255
    adv = APGD(eps=8, n_iter=8).run(o.model, o.x, y, init=o.x).adv_images
    assert ((adv - o.x)[0, :, 1, :] == 0).all()
    keep = y != 255
    assert torch.allclose(
        adv.permute(0, 2, 3, 1)[keep],
        o.linf_optimum(8).permute(0, 2, 3, 1)[keep],
        atol=1e-6,
    )


# ---------------------------------------------------------------------- oracle
@pytest.mark.parametrize('early_stop', [True, False])
@pytest.mark.parametrize('loss', ['CE', 'Mask-CE', 'JS-Avg'])
def test_linf_oracle(loss, early_stop, attack_models):
    o = attack_models.oracle()
    for attack in (
        APGD(eps=8, n_iter=10, loss=loss, early_stop=early_stop),
        APGDLargeEps(eps=8, n_iter=12, loss=loss, early_stop=early_stop),
    ):
        out = attack.run(o.model, o.x, o.y, seeds=[0, 1])
        assert torch.allclose(out.adv_images, o.linf_optimum(8), atol=1e-5, rtol=0), (
            attack
        )
        assert torch.equal(out.adv_pred, o.y)  # the oracle stays correct


def test_l2_oracle_one_pixel(attack_models):
    # APGD picks x_best (where halved images restart) by comparing per-image CE in
    # fp32; near the optimum CE differences fall below fp32 resolution, so the
    # iterates settle within ~1e-3 of it (PGD, with no such restarts, reaches
    # 1e-5: see test_attack_pgd.py). The point is on the sphere in the right
    # direction; a wrong step or projection would be off by ~eps = 0.08.
    o = attack_models.oracle(b=3, h=1, w=1)
    eps = 20
    for attack in (
        APGD(eps=eps, norm='L2', n_iter=40),
        APGDLargeEps(eps=eps, norm='L2', n_iter=60),
    ):
        adv = attack(o.model, o.x, o.y, seeds=[0, 1, 2])
        delta = (adv - o.x).flatten(1)
        best = (o.l2_optimum(eps) - o.x).flatten(1)
        assert torch.allclose(
            delta.norm(dim=1), torch.full((3,), eps / 255), atol=1e-5, rtol=0
        ), attack
        assert (delta - best).norm(dim=1).max() < 2e-3, attack
        cos = torch.nn.functional.cosine_similarity(delta, best)
        assert (cos > 1 - 1e-3).all(), attack


# --------------------------------------------------------- returned point, cost
@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_returned_point_is_the_lowest_accuracy_iterate(norm, attack_models):
    net = attack_models.tiny_net()
    x, y = attack_models.batch(net=net, seed=3)
    rec = attack_models.Recorder(net)
    n = 12
    attack = APGD(
        eps=4 * EPS[norm], norm=norm, n_iter=n, loss=Wander(), early_stop=False
    )
    out = attack.run(rec, x, y, seeds=SEEDS)
    # x_0 .. x_n, one forward each, then one forward for the returned prediction
    assert len(rec.inputs) == n + 2
    assert torch.equal(rec.inputs[-1], out.adv_images)
    iterates = rec.inputs[: n + 1]
    accs = torch.stack(
        [(net(it).argmax(1) == y).float().mean((1, 2)) for it in iterates]
    )
    newest = attack.zero_acc == 'reference'
    picks = [_lowest_accuracy_pick(accs[:, i].tolist(), newest) for i in range(len(x))]
    for i, t in enumerate(picks):
        assert torch.equal(out.adv_images[i], iterates[t][i])
        assert torch.equal(out.adv_pred[i], net(iterates[t][i : i + 1]).argmax(1)[0])
    assert any(t != n for t in picks), 'test is trivial: every pick is the last'


def _replay(attack, net, x, y, xs, n, objective, first_window):
    """Replay APGD from its recorded iterates ``xs`` (section 3.2) with the
    step-size control of ``first_window``; returns ``(restarts, ctl, halvings)``.
    """
    tm = attack.threat_model
    ce_obj = CrossEntropy()

    def grad_and_ce(point):
        point = point.clone().requires_grad_(True)
        logits = net(point)
        ce = ce_obj(logits, y).detach()
        return torch.autograd.grad(objective(logits, y).sum(), point)[0], ce

    g, ce0 = grad_and_ce(xs[0])
    ctl = APGDStepSizeControl(n, ce0, 2 * tm.radius, first_window=first_window)
    x_cur = x_prev = x_best = xs[0]
    g_best = g
    restarts, halvings = 0, []
    for i in range(n):
        a = 1.0 if i == 0 else 0.75
        eta = ctl.eta.view(-1, 1, 1, 1)
        z = tm.project(x_cur + eta * tm.direction(g), x)
        expected = tm.project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), x)
        assert torch.allclose(xs[i + 1], expected, atol=1e-6, rtol=0), i
        x_prev, x_cur = x_cur, xs[i + 1]
        if i == n - 1:
            break
        g, ce = grad_and_ce(x_cur)
        improved, halved = ctl.update(i, ce)
        keep = improved.view(-1, 1, 1, 1)
        x_best = torch.where(keep, x_cur, x_best)
        g_best = torch.where(keep, g, g_best)
        if halved is not None:
            halvings.append(halved)
            moved = halved & (x_best != x_cur).flatten(1).any(1)
            restarts += int(moved.sum())
            x_cur = torch.where(halved.view(-1, 1, 1, 1), x_best, x_cur)
            g = torch.where(halved.view(-1, 1, 1, 1), g_best, g)
    return restarts, ctl, halvings


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_iterates_follow_the_apgd_update_rule(norm, attack_models, problem):
    """Replay APGD from its recorded iterates (section 3.2): momentum (a = 1 at the
    first step, 0.75 after), step 2*eps halved per the step-size control, halved
    images restart from x_best with its gradient."""
    net, x, y = problem
    eps, n = EPS[norm], 30
    attack = APGD(eps=eps, norm=norm, n_iter=n, early_stop=False)
    rec = attack_models.Recorder(net)
    attack.run(rec, x, y, seeds=SEEDS)
    restarts, ctl, _ = _replay(
        attack, net, x, y, rec.inputs, n, CrossEntropy(), attack.first_window
    )
    assert restarts > 0  # the replay exercised restarts from x_best
    assert (ctl.eta < 2 * attack.threat_model.radius).any()


@pytest.mark.parametrize('mode', ['paper', 'reference'])
def test_first_window_reaches_the_attack(mode, attack_models):
    """The attack's iterates replay exactly with the control of its
    ``first_window`` mode, and on this problem the two modes halve differently
    at the first checkpoint (so a replay with the other mode would fail)."""
    net = attack_models.tiny_net()
    x, y = attack_models.batch(b=8, net=net, seed=5)
    n = 20
    attack = APGD(eps=16, n_iter=n, first_window=mode, early_stop=False, loss=Wander())
    rec = attack_models.Recorder(net)
    attack.run(rec, x, y, seeds=list(range(8)))
    _, _, halvings = _replay(attack, net, x, y, rec.inputs, n, Wander(), mode)
    # the other mode's decision at the first checkpoint, on the same CE trace
    ce_obj = CrossEntropy()
    with torch.no_grad():
        ces = [ce_obj(net(it), y) for it in rec.inputs[: n + 1]]
    other = 'reference' if mode == 'paper' else 'paper'
    ctl = APGDStepSizeControl(n, ces[0], 2 * 16 / 255, first_window=other)
    for i in range(apgd_checkpoints(n)[0] + 1):
        _, halved_other = ctl.update(i, ces[i + 1])
    assert not torch.equal(halvings[0], halved_other)


def test_first_window_has_one_default(attack_models):
    """``apgd_run`` and ``APGDStepSizeControl`` default to :data:`DEFAULT_MODES`,
    as every attack does: with no mode given, ``apgd_run`` is ``APGD()``'s run."""
    for attack in (APGD(), APGDLargeEps(), SEA(class_weights=[1.0] * 4)):
        assert attack.first_window == DEFAULT_MODES['first_window']
        assert attack.zero_acc == DEFAULT_MODES['zero_acc']
    ctl = APGDStepSizeControl(5, torch.tensor([2.0]), 0.1)
    same = APGDStepSizeControl(
        5, torch.tensor([2.0]), 0.1, first_window=DEFAULT_MODES['first_window']
    )
    assert torch.equal(ctl.ce_prev, same.ce_prev)
    # the problem of test_first_window_reaches_the_attack: the modes differ there
    net = attack_models.tiny_net()
    x, y = attack_models.batch(b=8, net=net, seed=5)
    n = 20
    attack = APGD(eps=16, n_iter=n, early_stop=False, loss=Wander())
    x0 = attack.threat_model.random_start(x, seeds=list(range(8)))
    out = attack.run(net, x, y, init=x0)
    target = SegmentationTarget(net, y, objectives=[attack.objective])
    tm = attack.threat_model
    run = apgd_run(target, attack.objective, tm, x, x0, tm.radius, n, early_stop=False)
    assert torch.equal(run.adv_images, out.adv_images)
    paper = APGD(
        eps=16, n_iter=n, early_stop=False, loss=Wander(), first_window='paper'
    )
    assert not torch.equal(paper.run(net, x, y, init=x0).adv_images, out.adv_images)


def test_last_iteration_needs_no_backward(attack_models, problem):
    net, x, y = problem
    rec = attack_models.Recorder(net)
    APGD(eps=8, n_iter=7, early_stop=False)(rec, x, y)
    # n + 1 iterates, + 1 forward for the returned point's prediction
    assert (rec.n_forward, rec.n_backward) == (9, 7)
    rec = attack_models.Recorder(net)
    APGDLargeEps(eps=8, n_iter=10, early_stop=False)(rec, x, y)
    # 3 stages: n_i + 1 each, + 1 for the prediction of the final point
    assert (rec.n_forward, rec.n_backward) == (14, 10)


def test_early_stop_gives_the_same_result_with_less_compute(attack_models):
    """zero_acc='leave' (the default): leaving the batch changes nothing."""
    net = attack_models.tiny_net()
    x, y = attack_models.batch(b=6, h=2, w=2, net=net, seed=1)
    seeds = list(range(6))
    for make in (
        lambda es: APGD(eps=128, n_iter=15, early_stop=es, zero_acc='leave'),
        lambda es: APGDLargeEps(
            eps=64, n_iter=20, early_stop=es, loss='Mask-CE', zero_acc='leave'
        ),
    ):
        runs = {}
        for es in (False, True):
            rec = attack_models.Recorder(net)
            runs[es] = (make(es).run(rec, x, y, seeds=seeds), rec.n_images)
        (full, n_full), (stop, n_stop) = runs[False], runs[True]
        assert torch.equal(full.adv_images, stop.adv_images)
        assert torch.equal(full.adv_pred, stop.adv_pred)
        acc = (full.adv_pred == y).float().mean((1, 2))
        assert (acc == 0).any() and (acc > 0).any()  # the test is not trivial
        assert n_stop < n_full


def test_init_replaces_the_random_start(attack_models, problem):
    net, x, y = problem
    init = (x + 0.5).clamp(0, 1)  # far outside the ball: projected first
    rec = attack_models.Recorder(net)
    out = APGD(eps=8, n_iter=3, early_stop=False).run(rec, x, y, init=init)
    assert torch.allclose(
        rec.inputs[0], (x + 8 / 255).clamp(0, 1).minimum(init), atol=1e-7, rtol=0
    )
    attack_models.assert_feasible(out.adv_images, x, 8, 'Linf')
    with pytest.raises(ValueError, match='init'):
        APGD(eps=8, n_iter=3).run(net, x, y, init=x[:2])


def test_stages_start_inside_the_smaller_balls(attack_models, problem):
    net, x, y = problem
    eps, n = 8, 20
    stages = radius_schedule(n, eps)  # [(6, 16), (6, 12), (8, 8)]
    rec = attack_models.Recorder(net)
    attack = APGDLargeEps(eps=eps, n_iter=n, early_stop=False)
    out = attack.run(rec, x, y, seeds=SEEDS)
    # each stage: n_i + 1 iterates; the last one also predicts its returned point
    starts = [0, stages[0][0] + 1, stages[0][0] + stages[1][0] + 2]
    assert len(rec.inputs) == n + 4
    bounds = []
    for (n_i, eps_i), s in zip(stages, starts):
        block = torch.stack(rec.inputs[s : s + n_i + 1])  # iterates of the stage
        dist = (block - x).abs().flatten(2).amax(2)
        assert (dist <= eps_i / 255 + 1e-6).all()
        bounds.append(dist.max().item() * 255)
    assert bounds[0] > 12 + 1e-3 and bounds[1] > 8 + 1e-3  # larger balls are used
    # stage 2 starts from stage 1's returned point projected onto the 1.5 eps ball
    stage1 = APGD(eps=16, n_iter=6, early_stop=False).run(net, x, y, seeds=SEEDS)
    proj = x + (stage1.adv_images - x).clamp(-12 / 255, 12 / 255)
    assert torch.allclose(rec.inputs[starts[1]], proj.clamp(0, 1), atol=1e-7)
    stage2 = APGD(eps=12, n_iter=6, early_stop=False).run(
        net, x, y, init=rec.inputs[starts[1]]
    )
    proj = x + (stage2.adv_images - x).clamp(-8 / 255, 8 / 255)
    assert torch.allclose(rec.inputs[starts[2]], proj.clamp(0, 1), atol=1e-7)
    final = APGD(eps=8, n_iter=8, early_stop=False).run(
        net, x, y, init=rec.inputs[starts[2]]
    )
    assert torch.equal(final.adv_images, out.adv_images)


def test_build_from_registry(problem):
    net, x, y = problem
    attack = ATTACKS.build(dict(type='APGD', eps=4, n_iter=5, loss='SegPGD'))
    assert isinstance(attack, APGD) and attack.objective.name == 'SegPGD'
    large = ATTACKS.build(dict(type='APGDLargeEps', eps=4, n_iter=10, norm='l2'))
    assert large.norm == 'L2' and large.stages == [(3, 8.0), (3, 6.0), (4, 4.0)]
    assert large(net, x, y).shape == x.shape
    with pytest.raises(ValueError, match='n_iter'):
        APGD(n_iter=-1)


# ------------------------------------------------ accuracy-0 images (zero_acc)
def _zero_acc_problem(attack_models):
    """A batch on which some images reach accuracy 0 within a few APGD
    iterations and others never do (tiny 2x2 images, a large radius)."""
    net = attack_models.tiny_net()
    x, y = attack_models.batch(b=6, h=2, w=2, net=net, seed=1)
    return net, x, y, list(range(6))


def _iterate_accuracies(net, iterates, y):
    return torch.stack(
        [(net(it).argmax(1) == y).float().mean((1, 2)) for it in iterates]
    )


@pytest.mark.parametrize('early_stop', [True, False])
def test_zero_acc_reference_returns_the_newest_accuracy_0_iterate(
    early_stop, attack_models
):
    net, x, y, seeds = _zero_acc_problem(attack_models)
    n = 15
    rec = attack_models.Recorder(net)
    attack = APGD(eps=128, n_iter=n, zero_acc='reference', early_stop=early_stop)
    out = attack.run(rec, x, y, seeds=seeds)
    # accuracy-0 images stay in the batch: every forward sees the whole batch
    assert all(len(t) == len(x) for t in rec.inputs)
    assert torch.equal(rec.inputs[-1], out.adv_images)  # the prediction's forward
    iterates = rec.inputs[:-1]
    assert len(iterates) == n + 1  # not every image reaches 0: no early stop
    accs = _iterate_accuracies(net, iterates, y)
    newest = [_lowest_accuracy_pick(accs[:, i].tolist(), True) for i in range(len(x))]
    first = [_lowest_accuracy_pick(accs[:, i].tolist()) for i in range(len(x))]
    at_zero = accs.min(0).values == 0
    assert at_zero.any() and not at_zero.all()  # the test is not trivial
    for i, t in enumerate(newest):
        assert torch.equal(out.adv_images[i], iterates[t][i]), i
        if at_zero[i]:  # the last iterate with accuracy 0
            assert t == max(k for k in range(n + 1) if accs[k, i] == 0)
    # the newest accuracy-0 iterate is not the first one and lies elsewhere
    moved = [i for i in range(len(x)) if at_zero[i] and newest[i] != first[i]]
    assert moved and any(
        not torch.equal(iterates[newest[i]][i], iterates[first[i]][i]) for i in moved
    )


def test_zero_acc_leave_returns_the_first_accuracy_0_iterate(attack_models):
    net, x, y, seeds = _zero_acc_problem(attack_models)
    n = 15
    rec = attack_models.Recorder(net)
    out = APGD(eps=128, n_iter=n, zero_acc='leave', early_stop=False).run(
        rec, x, y, seeds=seeds
    )
    iterates = rec.inputs[:-1]
    accs = _iterate_accuracies(net, iterates, y)
    at_zero = accs.min(0).values == 0
    assert at_zero.any()
    for i in range(len(x)):
        t = _lowest_accuracy_pick(accs[:, i].tolist())
        assert torch.equal(out.adv_images[i], iterates[t][i]), i
        if at_zero[i]:
            assert t == min(k for k in range(n + 1) if accs[k, i] == 0)
    # and with early_stop (the default) the images leave, same result
    stop = APGD(eps=128, n_iter=n, zero_acc='leave').run(net, x, y, seeds=seeds)
    assert torch.equal(stop.adv_images, out.adv_images)


def test_zero_acc_reference_stops_when_every_image_is_at_0(attack_models):
    net, x, y, seeds = _zero_acc_problem(attack_models)
    n = 15
    full = APGD(eps=128, n_iter=n, zero_acc='leave', early_stop=False)
    acc = (full.run(net, x, y, seeds=seeds).adv_pred == y).float().mean((1, 2))
    zero = torch.nonzero(acc == 0).squeeze(1)
    assert len(zero) >= 2
    xs, ys, ss = x[zero], y[zero], [seeds[i] for i in zero.tolist()]
    runs = {}
    for early_stop in (True, False):
        rec = attack_models.Recorder(net)
        attack = APGD(eps=128, n_iter=n, zero_acc='reference', early_stop=early_stop)
        runs[early_stop] = (attack.run(rec, xs, ys, seeds=ss), rec.n_forward)
    (stop, n_stop), (full_run, n_full) = runs[True], runs[False]
    assert n_full == n + 2 and n_stop < n_full  # stopped once all were at 0
    for out in (stop, full_run):
        assert ((out.adv_pred == ys).float().mean((1, 2)) == 0).all()


def test_zero_acc_reference_in_the_progressive_schedule(attack_models):
    """APGDLargeEps hands each stage the newest accuracy-0 point: the results of
    the two modes differ on a problem where images reach 0 in stage 1."""
    net, x, y, seeds = _zero_acc_problem(attack_models)
    outs = {
        mode: APGDLargeEps(eps=64, n_iter=20, zero_acc=mode).run(net, x, y, seeds=seeds)
        for mode in ('leave', 'reference')
    }
    for out in outs.values():
        attack_models.assert_feasible(out.adv_images, x, 64, 'Linf')
    assert not torch.equal(outs['leave'].adv_images, outs['reference'].adv_images)


# ------------------------------------------ first window of the step-size control
def _first_window_trace(n, ce0, first, increases):
    """A CE trace: CE(x_1) = ``first``, then the first window's other steps
    increase CE at the given positions and decrease it elsewhere; after the first
    window CE keeps increasing."""
    w1 = apgd_checkpoints(n)[0] + 1
    trace = [first]
    for k in range(1, n):
        up = k >= w1 or (k - 1) in increases
        trace.append(trace[-1] + (0.1 if up else -0.01))
    return torch.tensor(trace)


def test_first_window_reference_counts_the_first_step_as_an_increase():
    n = 90
    w1 = apgd_checkpoints(n)[0] + 1  # 19 steps, (a) halves at <= 14.25 increases
    assert w1 == 19
    ce0 = 1.0
    # steps 2..19 of the first window: 14 increases, 4 decreases
    inc14 = set(range(14))
    traces = torch.stack(
        [
            # CE(x_1) < CE(x_0): paper counts 14 (halve), reference 15 (keep)
            _first_window_trace(n, ce0, 0.5, inc14),
            # CE(x_1) == CE(x_0): the same
            _first_window_trace(n, ce0, ce0, inc14),
            # CE(x_1) > CE(x_0): both count 15, neither halves
            _first_window_trace(n, ce0, 1.5, inc14),
            # CE(x_1) < CE(x_0), 13 more increases: both halve (13 | 14)
            _first_window_trace(n, ce0, 0.5, set(range(13))),
            # CE(x_1) = 0 (< CE(x_0)): the reference's comparison with 0 is false
            # too, both count 14 and halve
            _first_window_trace(n, ce0, 0.0, inc14),
        ],
        dim=1,
    )
    eta0 = 0.1
    ctls = {
        mode: APGDStepSizeControl(n, torch.full((5,), ce0), eta0, first_window=mode)
        for mode in ('paper', 'reference')
    }
    halved = {}
    for mode, ctl in ctls.items():
        for i in range(w1):
            _, h = ctl.update(i, traces[i])
        halved[mode] = h.tolist()
    assert halved['paper'] == [True, True, False, True, True]
    assert halved['reference'] == [False, False, False, True, True]
    assert ctls['paper'].eta.tolist() == pytest.approx(
        [eta0 / 2] * 2 + [eta0] + [eta0 / 2] * 2
    )
    assert ctls['reference'].eta.tolist() == pytest.approx([eta0] * 3 + [eta0 / 2] * 2)
    # later windows count alike in both modes
    for i in range(w1, w1 + 5):
        for ctl in ctls.values():
            ctl.update(i, traces[i])
    assert torch.equal(ctls['paper'].n_increases, ctls['reference'].n_increases)
    with pytest.raises(ValueError, match='first_window'):
        APGDStepSizeControl(n, torch.ones(1), eta0, first_window='autoattack')


# ----------------------------------------------------------- options, compat
def test_compat_reference_sets_both_options():
    for cls in (APGD, APGDLargeEps):
        # the defaults (DEFAULT_MODES): the reference's first window, but
        # accuracy-0 images leave the batch (results independent of the batch)
        default = cls(eps=8, n_iter=10)
        assert (default.compat, default.zero_acc, default.first_window) == (
            None,
            'leave',
            'reference',
        )
        fast = cls(eps=8, n_iter=10, zero_acc='leave', first_window='paper')
        assert (fast.compat, fast.zero_acc, fast.first_window) == (
            None,
            'leave',
            'paper',
        )
        ref = cls(eps=8, n_iter=10, compat='reference')
        assert (ref.compat, ref.zero_acc, ref.first_window) == ('reference',) * 3
        both = cls(eps=8, n_iter=10, zero_acc='reference', first_window='reference')
        assert both.compat == 'reference'
        one = cls(eps=8, n_iter=10, first_window='paper')
        assert (one.compat, one.zero_acc, one.first_window) == (
            None,
            'leave',
            'paper',
        )
        assert cls(eps=8, n_iter=10, compat='default').zero_acc == 'leave'
        with pytest.raises(ValueError, match="compat='reference' sets zero_acc"):
            cls(eps=8, n_iter=10, compat='reference', zero_acc='leave')
        with pytest.raises(ValueError, match='compat must be'):
            cls(eps=8, n_iter=10, compat='autoattack')
        with pytest.raises(ValueError, match='zero_acc must be one of'):
            cls(eps=8, n_iter=10, zero_acc='first')
        built = ATTACKS.build(dict(type=cls.__name__, n_iter=4, compat='reference'))
        assert built.zero_acc == built.first_window == 'reference'


def test_mode_options_are_checked_by_one_function(monkeypatch):
    """``resolve_modes`` checks all four mode options; every attack, the
    optimiser loop and the step-size control go through it."""
    assert resolve_modes() == APGDModes(None, 'leave', 'reference', False)
    assert resolve_modes('reference') == APGDModes(
        'reference', 'reference', 'reference', False
    )
    assert resolve_modes(stall_stop=1).stall_stop is True
    with pytest.raises(ValueError, match="^X: stall_stop needs zero_acc='leave'"):
        resolve_modes(zero_acc='reference', stall_stop=True, owner='X')
    with pytest.raises(ValueError, match='APGDStepSizeControl: first_window must'):
        APGDStepSizeControl(10, torch.zeros(2), 0.1, first_window='first')
    net = torch.nn.Conv2d(3, 2, 1)
    target = SegmentationTarget(net, torch.zeros(1, 4, 4, dtype=torch.long))
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match='apgd_run: stall_stop needs zero_acc='):
        apgd_run(
            target,
            CrossEntropy(),
            APGD().threat_model,
            x,
            x,
            0.1,
            2,
            zero_acc='reference',
            stall_stop=True,
        )
    import mmseg_robust.attacks.apgd as apgd_module

    calls = []

    def spy(*args, **kwargs):
        calls.append(args[-1] if len(args) == 5 else kwargs.get('owner'))
        return resolve_modes(*args, **kwargs)

    monkeypatch.setattr(apgd_module, 'resolve_modes', spy)
    monkeypatch.setattr('mmseg_robust.attacks.sea.resolve_modes', spy)
    APGD(n_iter=2)
    APGDLargeEps(n_iter=2)
    SEA(n_iter=2, losses=('CE',))
    assert calls == ['APGD', 'APGDLargeEps', 'SEA', 'APGDLargeEps']


def test_compat_reference_is_both_options(problem):
    net, x, y = problem
    a = APGDLargeEps(eps=8, n_iter=12, compat='reference')
    b = APGDLargeEps(eps=8, n_iter=12, zero_acc='reference', first_window='reference')
    assert torch.equal(a(net, x, y, seeds=SEEDS), b(net, x, y, seeds=SEEDS))


def test_large_eps_reports_its_stages(problem):
    net, x, y = problem
    seen = []
    APGDLargeEps(eps=8, n_iter=10).run(net, x, y, progress=seen.append)
    assert seen == [
        'stage 1/3: radius 16/255, 3 iterations',
        'stage 2/3: radius 12/255, 3 iterations',
        'stage 3/3: radius 8/255, 4 iterations',
    ]
    seen = []
    APGD(eps=8, n_iter=3).run(net, x, y, progress=seen.append, init=x)
    assert seen == []  # one run, nothing to report; run() accepts progress


def _at_accuracy_0(net, points, labels):
    """Per image: no pixel of ``points`` is classified correctly."""
    with torch.no_grad():
        return (net(points).argmax(1) != labels).flatten(1).all(1)


def test_zero_acc_modes_at_batch_size_1(attack_models):
    """With one image per batch the reference's early stop ends a run at the
    image's first accuracy-0 iterate, as 'leave' does, unless the run starts at
    accuracy 0: the reference still makes one update (and returns it if its
    accuracy is 0 too), 'leave' makes none. So one APGD run from a random start
    not at accuracy 0 agrees, the progressive schedule, whose later stages can
    start at accuracy 0, does not."""
    net, x, y, seeds = _zero_acc_problem(attack_models)
    compared = differ = 0
    for i in range(len(x)):
        one = slice(i, i + 1)
        x0 = APGD(eps=64).threat_model.random_start(x[one], 64 / 255, seeds[one])
        if not _at_accuracy_0(net, x0, y[one]).item():
            outs = [
                APGD(eps=64, n_iter=20, zero_acc=mode).run(
                    net, x[one], y[one], seeds=seeds[one]
                )
                for mode in ('leave', 'reference')
            ]
            assert torch.equal(outs[0].adv_images, outs[1].adv_images), i
            compared += 1
        outs = [
            APGDLargeEps(eps=64, n_iter=20, loss='JS-Avg', zero_acc=mode).run(
                net, x[one], y[one], seeds=seeds[one]
            )
            for mode in ('leave', 'reference')
        ]
        differ += not torch.equal(outs[0].adv_images, outs[1].adv_images)
    assert compared > 0 and differ > 0


@pytest.mark.parametrize('loss', ['JS-Avg', 'CE', 'Mask-CE'])
@pytest.mark.parametrize('batch_size', [1, 6])
def test_compat_reference_equals_the_reference_apgd(
    loss, batch_size, attack_models, reference_apgd
):
    """``compat='reference'`` against a port of the reference's APGD loop
    (tests/reference_apgd.py) on images of which some start a radius stage at
    accuracy 0: the reference tests its early stop after an update, so even
    then it makes one (docs/algorithms.md section 3.2)."""
    net, x, y, seeds = _zero_acc_problem(attack_models)
    eps, n = 64, 20
    attack = APGDLargeEps(eps=eps, n_iter=n, loss=loss, compat='reference')
    starts_at_0 = 0
    for lo in range(0, len(x), batch_size):
        part = slice(lo, lo + batch_size)
        xb, yb, sb = x[part], y[part], seeds[part]
        ours = attack.run(net, xb, yb, seeds=sb)
        x0 = attack.threat_model.random_start(xb, 2 * eps / 255, sb)
        ref, starts = reference_apgd.reference_apgd_large_eps(
            net, attack.objective, xb, yb, eps / 255, n, x0
        )
        assert torch.equal(ours.adv_images, ref), lo
        with torch.no_grad():
            assert torch.equal(ours.adv_pred, net(ref).argmax(1)), lo
        starts_at_0 += sum(int(_at_accuracy_0(net, s, yb).sum()) for s in starts[1:])
    assert starts_at_0 > 0  # the case the reference's order matters for


# ------------------------------------------- stalled images leave (stall_stop)
class _FlatWhereMarked(torch.nn.Module):
    """``net`` on the images whose pixel (0, 0) of channel 0 is below 0.5, and a
    constant (input-independent) prediction on the others: there the gradient is
    0, CE never improves and the step size halves at every checkpoint."""

    def __init__(self, net, num_classes=4):
        super().__init__()
        self.net = net
        bias = torch.linspace(1, 0, num_classes).view(1, -1, 1, 1)
        self.register_buffer('bias', bias)

    def forward(self, x):
        flat = (x[:, 0, 0, 0] > 0.5).detach().view(-1, 1, 1, 1)
        out = self.net(x)
        return torch.where(flat, 0 * out + self.bias, out)


def _stall_problem(attack_models, b=6):
    """Images 0, 2, 4 are flat (they stall), the others are attacked normally."""
    net = attack_models.tiny_net()
    x, y = attack_models.batch(b=b, net=net, seed=2)
    x[:, 0, 0, 0] = 0.0
    x[::2, 0, 0, 0] = 1.0  # far from 0.5: the marker survives the attack
    return _FlatWhereMarked(net).eval(), x, y, list(range(b))


def test_stall_stop_is_off_by_default(problem):
    net, x, y = problem
    for attack in (APGD(), APGDLargeEps()):
        assert attack.stall_stop is False and 'stall_stop' not in repr(attack)
    on = APGD(n_iter=10, stall_stop=True)
    assert on.stall_stop and 'stall_stop=True' in repr(on)
    # False is the default: the same run
    a = APGD(n_iter=20).run(net, x, y, seeds=SEEDS)
    b = APGD(n_iter=20, stall_stop=False).run(net, x, y, seeds=SEEDS)
    assert torch.equal(a.adv_images, b.adv_images)
    for make in (APGD, APGDLargeEps):
        with pytest.raises(ValueError, match="stall_stop needs zero_acc='leave'"):
            make(stall_stop=True, compat='reference')


def test_stall_stop_flat_images_leave_once_the_step_has_collapsed(attack_models):
    """Every image flat: the batch leaves after the STALL_HALVINGS-th halving
    (checkpoint) once ``stall_patience`` iterations passed without improvement,
    with the same returned point as the full run."""
    model, x, y, seeds = _stall_problem(attack_models)
    x[:, 0, 0, 0] = 1.0  # all flat
    n = 30
    runs = {}
    for stall in (False, True):
        rec = attack_models.Recorder(model)
        out = APGD(eps=8, n_iter=n, stall_stop=stall).run(rec, x, y, seeds=seeds)
        runs[stall] = out, rec
    (full, rec_full), (fast, rec_fast) = runs[False], runs[True]
    assert ((full.adv_pred == y).float().mean((1, 2)) > 0).all()  # none leaves at 0
    assert torch.equal(full.adv_images, fast.adv_images)
    assert torch.equal(full.adv_pred, fast.adv_pred)
    # it leaves before update i = max(checkpoint of the 3rd halving + 1, patience)
    leave = max(apgd_checkpoints(n)[STALL_HALVINGS - 1] + 1, stall_patience(n))
    assert leave < n
    assert rec_full.n_forward == n + 2
    assert rec_fast.n_forward == leave + 2  # x_0 .. x_leave, and the prediction
    assert rec_fast.n_backward == leave + 1  # x_0 .. x_leave each had a backward


def test_stall_stop_returns_the_lowest_accuracy_iterate_so_far(attack_models):
    """One image per run: the image leaves early on this problem, and its
    returned point is the lowest-accuracy iterate among those it reached."""
    net = attack_models.tiny_net()
    x, y = attack_models.batch(b=6, net=net, seed=3)
    n, left = 40, 0
    for i in range(len(x)):
        rec = attack_models.Recorder(net)
        attack = APGD(eps=4, n_iter=n, stall_stop=True, loss=Wander())
        out = attack.run(rec, x[i : i + 1], y[i : i + 1], seeds=[i])
        iterates = rec.inputs[:-1]
        assert torch.equal(rec.inputs[-1], out.adv_images)
        left += len(iterates) < n + 1
        accs = _iterate_accuracies(net, iterates, y[i : i + 1])[:, 0].tolist()
        t = _lowest_accuracy_pick(accs)
        assert torch.equal(out.adv_images, iterates[t]), i
    assert left > 0, 'test is trivial: no image left early'


def test_stall_stop_is_per_image(attack_models):
    """Flat images leave, the others run on: each image's result is what it gets
    alone or in another batch, and the flat ones get the full run's result."""
    model, x, y, seeds = _stall_problem(attack_models)
    for make in (
        lambda s: APGD(eps=8, n_iter=30, stall_stop=s),
        lambda s: APGDLargeEps(eps=8, n_iter=40, loss='Mask-CE', stall_stop=s),
    ):
        rec = attack_models.Recorder(model)
        whole = make(True).run(rec, x, y, seeds=seeds)
        assert min(len(t) for t in rec.inputs) < len(x)  # some images left
        parts = [
            make(True).run(model, x[idx], y[idx], seeds=[seeds[i] for i in idx])
            for idx in ([0, 3], [1, 2, 5], [4])
        ]
        order = [0, 3, 1, 2, 5, 4]
        for k, i in enumerate(order):
            part = parts[0 if k < 2 else 1 if k < 5 else 2]
            j = k if k < 2 else k - 2 if k < 5 else 0
            assert torch.equal(whole.adv_images[i], part.adv_images[j]), i
        full = make(False).run(model, x, y, seeds=seeds)
        assert torch.equal(whole.adv_images[::2], full.adv_images[::2])
