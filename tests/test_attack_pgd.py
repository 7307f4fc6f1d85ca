"""FGSM, BIM, PGD (docs/algorithms.md section 3.1) and the Attack base class:
invariants, analytic oracle, labels/valid handling, seeds and input errors."""

import pytest
import torch

from mmseg_robust.attacks import BIM, FGSM, PGD, Attack, AttackOutput
from mmseg_robust.registry import ATTACKS, OBJECTIVES

pytestmark = pytest.mark.usefixtures('attack_one_thread')

SEEDS = [11, 12, 13, 14]

ATTACKS_UNDER_TEST = {
    'FGSM': lambda eps, norm: FGSM(eps=eps, norm=norm),
    'BIM': lambda eps, norm: BIM(eps=eps, norm=norm, steps=5),
    'PGD': lambda eps, norm: PGD(eps=eps, norm=norm, steps=5),
    'PGD-best': lambda eps, norm: PGD(
        eps=eps, norm=norm, steps=5, best_iterate=True, loss='Mask-CE'
    ),
}
EPS = {'Linf': 8, 'L2': 64}


@pytest.fixture
def problem(attack_models):
    net = attack_models.tiny_net()
    x, y = attack_models.batch(net=net)
    return net, x, y


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
@pytest.mark.parametrize('name', list(ATTACKS_UNDER_TEST))
def test_invariants(name, norm, problem, attack_models):
    net, x, y = problem
    eps = EPS[norm]
    attack = ATTACKS_UNDER_TEST[name](eps, norm)
    out = attack.run(net, x, y, seeds=SEEDS)
    assert isinstance(out, AttackOutput)
    attack_models.assert_feasible(out.adv_images, x, eps, norm)
    assert out.adv_pred.dtype == torch.long and out.adv_pred.shape == y.shape
    assert torch.equal(out.adv_pred, net(out.adv_images).argmax(1))
    clean = (net(x).argmax(1) == y).float().mean((1, 2))
    robust = (out.adv_pred == y).float().mean((1, 2))
    assert (robust <= clean).all() and (robust < clean).any()
    # same seeds, same output; __call__ returns the images
    assert torch.equal(attack(net, x, y, seeds=SEEDS), out.adv_images)


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
@pytest.mark.parametrize('name', list(ATTACKS_UNDER_TEST))
def test_eps_zero_returns_clean_images_and_predictions(name, norm, problem):
    net, x, y = problem
    out = ATTACKS_UNDER_TEST[name](0, norm).run(net, x, y)
    assert torch.equal(out.adv_images, x)
    assert torch.equal(out.adv_pred, net(x).argmax(1))


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_seeds_make_results_batch_independent(norm, problem):
    net, x, y = problem
    attack = PGD(eps=EPS[norm], norm=norm, steps=3)
    torch.manual_seed(0)
    full = attack.run(net, x, y, seeds=SEEDS)
    torch.manual_seed(1)  # the global RNG must not matter
    a = attack.run(net, x[:2], y[:2], seeds=SEEDS[:2])
    b = attack.run(net, x[2:], y[2:], seeds=SEEDS[2:])
    assert torch.equal(full.adv_images, torch.cat([a.adv_images, b.adv_images]))
    assert torch.equal(full.adv_pred, torch.cat([a.adv_pred, b.adv_pred]))
    # without seeds the global RNG decides
    torch.manual_seed(3)
    g1 = attack(net, x, y)
    torch.manual_seed(3)
    assert torch.equal(attack(net, x, y), g1)
    assert not torch.equal(g1, full.adv_images)


# ------------------------------------------------------------------------ oracle
@pytest.mark.parametrize(
    'loss',
    [
        'CE',
        'Mask-CE',
        'SegPGD',
        'JS-Avg',
        'CosPGD',
        dict(type='Mask-CE-Bal', class_weights=[0.3, 0.7]),
    ],
)
def test_linf_oracle_pgd_reaches_the_optimal_vertex(loss, attack_models):
    o = attack_models.oracle()
    for attack in (
        PGD(eps=8, steps=10, loss=loss),
        BIM(eps=8, steps=4, loss=loss),
        FGSM(eps=8, loss=loss),
    ):
        adv = attack(o.model, o.x, o.y, seeds=[0, 1])
        assert torch.allclose(adv, o.linf_optimum(8), atol=1e-5, rtol=0), attack


def test_l2_oracle_one_pixel(attack_models):
    o = attack_models.oracle(b=3, h=1, w=1)
    eps = 20
    for attack in (
        PGD(eps=eps, norm='L2', steps=40, step_size=eps),
        BIM(eps=eps, norm='L2', steps=3),
        FGSM(eps=eps, norm='L2'),
    ):
        adv = attack(o.model, o.x, o.y, seeds=[0, 1, 2])
        assert torch.allclose(adv, o.l2_optimum(eps), atol=1e-5, rtol=0), attack


def test_step_size_is_in_255_units(attack_models):
    o = attack_models.oracle()
    # one BIM step of 2/255 from the clean image moves every coordinate by 2/255
    adv = BIM(eps=8, steps=1, step_size=2)(o.model, o.x, o.y)
    assert torch.allclose(adv, o.x + 2 / 8 * (o.linf_optimum(8) - o.x), atol=1e-6)
    assert PGD(eps=8, steps=10).step_size == pytest.approx(2.0)


# --------------------------------------------------------------- best iterate
def test_best_iterate_returns_lowest_accuracy_iterate(attack_models):
    net = attack_models.tiny_net()
    x, y = attack_models.batch(net=net, seed=3)

    class Wander(OBJECTIVES.get('CE')):
        # an objective unrelated to accuracy: the iterates wander
        def pixel_loss(self, s):
            r = torch.linspace(-1, 1, s.logits.shape[1]).view(1, -1, 1, 1)
            return (s.logits * r).sum(1)

    rec = attack_models.Recorder(net)
    out = PGD(eps=32, steps=8, loss=Wander(), best_iterate=True).run(
        rec, x, y, seeds=SEEDS
    )
    # x_0 .. x_8, then one forward for the returned iterate's prediction
    assert len(rec.inputs) == 10
    assert torch.equal(rec.inputs[-1], out.adv_images)
    iterates = rec.inputs[:9]
    accs = torch.stack(
        [(net(it).argmax(1) == y).float().mean((1, 2)) for it in iterates]
    )
    picked = []
    for i in range(x.shape[0]):
        best, pick = None, None
        for t, acc in enumerate(accs[:, i].tolist()):
            if best is None or acc < best or (acc == best and best > 0):
                best, pick = acc, t
        picked.append(pick)
        assert torch.equal(out.adv_images[i], iterates[pick][i])
    assert any(p != len(iterates) - 1 for p in picked)  # not trivially the last
    final = PGD(eps=32, steps=8, loss=Wander()).run(net, x, y, seeds=SEEDS)
    assert torch.equal(final.adv_images, iterates[-1])


def test_pgd_cost_steps_backwards_and_one_extra_forward(attack_models):
    net = attack_models.tiny_net()
    x, y = attack_models.batch(net=net)
    rec = attack_models.Recorder(net)
    PGD(eps=8, steps=6)(rec, x, y)
    assert (rec.n_forward, rec.n_backward) == (7, 6)


# --------------------------------------------------------------- labels / valid
def test_ignored_and_padded_pixels_are_never_perturbed_by_bim(attack_models):
    # per-pixel linear model: a pixel that does not count has zero gradient
    o = attack_models.oracle(b=2, h=3, w=4)
    y = o.y.clone()
    y[0, 0, :] = 255
    valid = torch.ones_like(y, dtype=torch.bool)
    valid[1, :, 0] = False
    adv = BIM(eps=8, steps=3)(o.model, o.x, y, valid)
    counted = (y != 255) & valid
    delta = (adv - o.x).abs().amax(1)
    assert (delta[~counted] == 0).all()
    assert torch.allclose(
        adv[:, :, counted[0] & counted[1]],
        o.linf_optimum(8)[:, :, counted[0] & counted[1]],
        atol=1e-6,
    )


@pytest.mark.parametrize('name', list(ATTACKS_UNDER_TEST))
def test_pixels_that_do_not_count_do_not_change_the_result(name, problem):
    net, x, y = problem
    attack = ATTACKS_UNDER_TEST[name](8, 'Linf')
    y_ign = y.clone()
    y_ign[:, :2, :] = 255
    valid = torch.ones_like(y, dtype=torch.bool)
    valid[:, :, -3:] = False
    ref = attack.run(net, x, y_ign, valid, seeds=SEEDS)
    # other labels under the padding (even out of range) change nothing ...
    y_pad = y_ign.clone()
    y_pad[:, :, -3:] = 77
    same = attack.run(net, x, y_pad, valid, seeds=SEEDS)
    # ... and ignore_index pixels are the same as pixels marked invalid
    y_zero = y_ign.clone()
    y_zero[:, :2, :] = 0
    as_valid = attack.run(net, x, y_zero, valid & (y_ign != 255), seeds=SEEDS)
    for other in (same, as_valid):
        assert torch.equal(other.adv_images, ref.adv_images)
    # and the result differs from attacking all pixels
    assert not torch.equal(attack(net, x, y, seeds=SEEDS), ref.adv_images)


# ------------------------------------------------------------------------ errors
def test_unknown_loss_lists_available_names():
    with pytest.raises(ValueError, match=r"'Mask-XE'.*CE, Mask-CE, Mask-CE-Bal"):
        PGD(loss='Mask-XE')


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(eps=-1), 'eps'),
        (dict(norm='L1'), "'Linf'.*'L2'"),
        (dict(steps=-2), 'steps'),
        (dict(step_size=-1.0), 'step_size'),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PGD(**kwargs)


def test_bad_labels_name_values_classes_and_ignore_index(problem):
    net, x, y = problem
    bad = y.clone()
    bad[0, 0, 0] = 7
    bad[1, 0, 0] = -1
    with pytest.raises(ValueError, match=r'-1, 7.*K=4.*255'):
        PGD(steps=1)(net, x, bad)


def test_class_weight_length_mismatch(problem):
    net, x, y = problem
    attack = PGD(steps=1, loss=dict(type='Mask-CE-Bal', class_weights='voc'))
    with pytest.raises(ValueError, match='21 class weights.*K=4'):
        attack(net, x, y)


def test_input_errors(problem):
    net, x, y = problem
    attack = PGD(steps=1)
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        attack(net, x * 2 - 0.5, y)
    with pytest.raises(ValueError, match='labels must be a tensor'):
        attack(net, x, y[:1])
    # labels at another resolution need logits at that resolution
    with pytest.raises(ValueError, match='label resolution'):
        attack(net, x, y[:, :4])
    with pytest.raises(ValueError, match='labels must be integer'):
        attack(net, x, y.float())
    with pytest.raises(ValueError, match='seeds'):
        attack(net, x, y, seeds=[1, 2])
    with pytest.raises(ValueError, match='label resolution'):
        attack(lambda im: net(im)[:, :, ::2], x, y)

    def frozen(im):
        with torch.no_grad():
            return net(im)

    with pytest.raises(RuntimeError, match='no_grad'):
        attack(frozen, x, y)


def test_model_state_is_untouched_and_caller_may_be_in_no_grad(attack_models):
    net = attack_models.tiny_net().train().requires_grad_(True)
    x, y = attack_models.batch(net=net)
    with torch.no_grad():
        adv = PGD(eps=8, steps=2)(net, x, y, seeds=SEEDS)
    assert not adv.requires_grad
    assert net.training  # never switched to eval (the caller's job)
    assert all(p.grad is None for p in net.parameters())


def test_build_from_registry():
    attack = ATTACKS.build(dict(type='PGD', eps=4, steps=3, loss='Mask-CE'))
    assert isinstance(attack, PGD) and isinstance(attack, Attack)
    assert (attack.eps, attack.steps, attack.objective.name) == (4, 3, 'Mask-CE')
    bim = ATTACKS.build(dict(type='BIM', eps=7.65, steps=3, step_size=2.55))
    assert not bim.random_start and bim.step_size == 2.55
    fgsm = ATTACKS.build(dict(type='FGSM', eps=4, norm='l2'))
    assert (fgsm.steps, fgsm.step_size, fgsm.norm) == (1, 4, 'L2')


def test_labels_at_another_resolution(problem):
    # mmseg evaluates at the original image size: the model view may upsample.
    net, x, y = problem
    y2 = torch.nn.functional.interpolate(
        y[:, None].float(), scale_factor=2, mode='nearest'
    )[:, 0].long()

    def upsampling_view(im):
        return torch.nn.functional.interpolate(net(im), scale_factor=2, mode='bilinear')

    out = PGD(eps=8, steps=3, random_start=False).run(upsampling_view, x, y2)
    assert out.adv_pred.shape == y2.shape
    assert (out.adv_images - x).abs().max() <= 8 / 255 + 1e-6


@pytest.mark.parametrize(
    'make',
    [
        lambda **kw: PGD(eps=8, steps=4, **kw),
        lambda **kw: BIM(eps=8, steps=3, **kw),
        lambda **kw: FGSM(eps=8, **kw),
    ],
    ids=['PGD', 'BIM', 'FGSM'],
)
def test_predict_output_false_skips_the_forward_at_the_output(make, problem):
    """Same adversarial images without the forward at them; no prediction, and
    the statistics of the last evaluated iterate (the input of the last step)."""
    net, x, y = problem
    seen = []

    def counting(images):
        seen.append(images.detach().clone())
        return net(images)

    full = make().run(net, x, y, seeds=SEEDS)
    out = make(predict_output=False).run(counting, x, y, seeds=SEEDS)
    steps = make().steps
    assert len(seen) == steps  # one forward per gradient step, none after
    assert torch.equal(out.adv_images, full.adv_images)
    assert out.adv_pred is None
    assert 'final_loss' not in out.stats and 'final_acc' not in out.stats
    last = seen[-1]
    logits = net(last)
    acc = (logits.argmax(1) == y).float().mean((1, 2)).mean()
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert float(out.stats['last_acc']) == pytest.approx(float(acc), abs=1e-6)
    assert float(out.stats['last_loss']) == pytest.approx(float(ce), rel=1e-5)
    assert torch.equal(out.stats['start_loss'], full.stats['start_loss'])
    # best_iterate needs the forward to choose: it keeps it
    best = PGD(eps=8, steps=2, best_iterate=True, predict_output=False)
    assert best.run(net, x, y).adv_pred is not None
