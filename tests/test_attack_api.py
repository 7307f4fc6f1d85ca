"""The attack API every attack shares: one iteration argument (``steps``, alias
``n_iter``), the same ``stats`` keys, ensembles reporting their members, and the
progress callback."""

import warnings

import pytest
import torch

from mmseg_robust.attacks import SEA, AttackWarning
from mmseg_robust.attacks.base import CONVERGENCE_KEYS, STATS_KEYS, resolve_steps
from mmseg_robust.attacks.seg_logits import effective_valid
from mmseg_robust.registry import ATTACKS

pytestmark = pytest.mark.usefixtures('attack_one_thread')

WEIGHTS = [0.1, 0.2, 0.3, 0.4]
CONFIGS = [
    dict(type='FGSM'),
    dict(type='BIM', steps=3),
    dict(type='PGD', steps=3),
    dict(type='PGD', steps=3, best_iterate=True),
    dict(type='APGD', steps=4),
    dict(type='APGDLargeEps', steps=6),
    dict(type='SEA', steps=6, class_weights=WEIGHTS),
    dict(type='PAdam', steps=3),
    dict(type='APGD', steps=4, loss='Tsallis-CE'),
]


@pytest.fixture
def problem(attack_models):
    net = attack_models.tiny_net()
    x, y = attack_models.batch(net=net)
    return net, x, y


def _ce_and_acc(net, images, labels):
    """Mean CE over valid pixels and pixel accuracy, computed independently."""
    with torch.no_grad():
        logits = net(images)
    valid = effective_valid(labels, None, 255)
    ce = torch.nn.functional.cross_entropy(
        logits, torch.where(valid, labels, 0), reduction='none'
    )
    n = valid.sum()
    acc = ((logits.argmax(1) == labels) & valid).sum() / n
    return float((ce * valid).sum() / n), float(acc)


@pytest.mark.parametrize('cfg', CONFIGS, ids=lambda c: c['type'] + str(len(c)))
def test_stats_same_keys_and_final_at_the_returned_images(cfg, problem):
    net, x, y = problem
    out = ATTACKS.build(dict(cfg, eps=8)).run(net, x, y, seeds=[1, 2, 3, 4])
    # every attack's statistics, and APGD runs' late gain (attack_unconverged)
    assert set(out.stats) - set(CONVERGENCE_KEYS) == set(STATS_KEYS)
    loss, acc = _ce_and_acc(net, out.adv_images, y)
    assert float(out.stats['final_loss']) == pytest.approx(loss, rel=1e-5)
    assert float(out.stats['final_acc']) == pytest.approx(acc, abs=1e-6)


def test_stats_start_at_the_clean_images_without_random_start(problem):
    net, x, y = problem
    loss, acc = _ce_and_acc(net, x, y)
    for cfg in (
        dict(type='BIM', steps=2),
        dict(type='SEA', steps=3, class_weights=WEIGHTS),
    ):
        out = ATTACKS.build(dict(cfg, eps=8)).run(net, x, y)
        assert float(out.stats['start_loss']) == pytest.approx(loss, rel=1e-5)
        assert float(out.stats['start_acc']) == pytest.approx(acc, abs=1e-6)


def test_n_iter_is_an_alias_of_steps(problem):
    net, x, y = problem
    for kind in ('PGD', 'BIM', 'APGD', 'APGDLargeEps'):
        a = ATTACKS.build(dict(type=kind, eps=8, n_iter=3))
        b = ATTACKS.build(dict(type=kind, eps=8, steps=3))
        assert a.steps == b.steps == a.n_iter == 3
        assert torch.equal(a(net, x, y, seeds=[5] * 4), b(net, x, y, seeds=[5] * 4))
    sea = SEA(eps=8, n_iter=5, class_weights=WEIGHTS)
    assert sea.steps == 5 and all(m.steps == 5 for m in sea.attacks.values())
    with pytest.raises(ValueError, match='steps=3 and n_iter=4 disagree'):
        resolve_steps(3, 4, 10, 'PGD')
    with pytest.raises(ValueError, match='n_iter must be an int >= 1'):
        ATTACKS.build(dict(type='APGD', n_iter=-1))
    with pytest.raises(ValueError, match='steps must be an int >= 1'):
        ATTACKS.build(dict(type='PGD', steps=2.5))


def test_ensemble_reports_its_members_and_their_worst_case(problem):
    net, x, y = problem
    sea = SEA(eps=8, steps=6, class_weights=WEIGHTS)
    seen = []
    out = sea.run(net, x, y, seeds=[1, 2, 3, 4], progress=seen.append)
    # each member's name, then its own progress (its stages), prefixed
    stages = [(1, 16), (1, 12), (4, 8)]  # radius_schedule(6, 8)
    expected = []
    for name in sea.attacks:
        expected.append(name)
        expected += [
            f'{name}: stage {k}/3: radius {r}/255, {n} iteration' + 's' * (n > 1)
            for k, (n, r) in enumerate(stages, start=1)
        ]
    assert seen == expected
    assert list(out.members) == list(sea.attacks)
    assert out.by_attack('SEA') == out.members
    # each member equals the member attack run alone with its derived seeds
    from mmseg_robust.attacks import derive_seeds

    for a, (name, member) in enumerate(sea.attacks.items()):
        alone = member.run(net, x, y, seeds=derive_seeds([1, 2, 3, 4], a))
        assert torch.equal(alone.adv_images, out.members[name].adv_images)
    single = ATTACKS.build(dict(type='PGD', eps=8, steps=2)).run(net, x, y)
    assert single.members is None
    assert list(single.by_attack('PGD')) == ['PGD']


def test_ensemble_names_the_member_of_each_returned_image(problem):
    net, x, y = problem
    out = SEA(eps=8, steps=6, class_weights=WEIGHTS).run(net, x, y, seeds=[1, 2, 3, 4])
    names = list(out.members)
    for i in range(x.shape[0]):
        member = out.members[out.source('SEA', i)]
        assert torch.equal(member.adv_images[i], out.adv_images[i])
        correct = [int((m.adv_pred[i] == y[i]).sum()) for m in out.members.values()]
        assert names.index(out.source('SEA', i)) == correct.index(min(correct))


# ------------------------------------------------------------------ input checks
@pytest.mark.parametrize('kind', ['PGD', 'BIM', 'APGD', 'APGDLargeEps', 'SEA'])
@pytest.mark.parametrize('name', ['steps', 'n_iter'])
def test_zero_iterations_is_an_error(kind, name):
    extra = dict(class_weights=WEIGHTS) if kind == 'SEA' else {}
    with pytest.raises(ValueError, match=f'{name}=0 is zero iterations: the attack'):
        ATTACKS.build(dict(type=kind, eps=8, **{name: 0}, **extra))
    assert ATTACKS.build(dict(type=kind, eps=8, **{name: 1}, **extra)).steps == 1
    assert ATTACKS.build(dict(type='FGSM', eps=8)).steps == 1


@pytest.mark.parametrize('kind', ['FGSM', 'PGD', 'APGD', 'APGDLargeEps', 'SEA'])
def test_eps_in_unit_range_warns_and_beyond_the_pixel_range_fails(kind):
    extra = dict(class_weights=WEIGHTS) if kind == 'SEA' else {}
    with pytest.warns(
        AttackWarning, match=r'eps=0\.03 means 0\.03/255; did you mean eps=7\.65'
    ):
        ATTACKS.build(dict(type=kind, eps=0.03, **extra))
    with pytest.raises(ValueError, match='larger than the whole pixel range'):
        ATTACKS.build(dict(type=kind, eps=2040, **extra))
    # fine: eps=0 (clean), 1, 255; L2 radii above 255 (a 3x64x64 image has an L2
    # diameter of about 28000/255)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for eps in (0, 1, 8, 255):
            assert ATTACKS.build(dict(type=kind, eps=eps, **extra)).eps == eps
        assert ATTACKS.build(dict(type=kind, eps=1000, norm='L2', **extra)).eps == 1000
        # radii below one grey level that are no small-integer fraction, and a
        # confirmed value, do not warn
        for eps in (0.25, 0.5):
            assert ATTACKS.build(dict(type=kind, eps=eps, **extra)).eps == eps
        cfg = dict(type=kind, eps=0.03, eps_units='255', **extra)
        assert ATTACKS.build(cfg).eps == 0.03


@pytest.mark.parametrize('kind', ['PGD', 'APGD', 'SEA'])
def test_l2_radius_in_unit_interval_warns_when_the_attack_runs(kind, attack_models):
    extra = dict(class_weights=WEIGHTS) if kind == 'SEA' else {}
    net = attack_models.tiny_net(num_classes=4)
    images, labels = attack_models.batch(b=1, h=64, w=64, num_classes=4, net=net)
    attack = ATTACKS.build(dict(type=kind, eps=2.0, norm='L2', steps=1, **extra))
    with pytest.warns(AttackWarning, match=r'L2 eps=2 .*pass eps=510'):
        attack.run(net, images, labels)
    attack = ATTACKS.build(
        dict(type=kind, eps=2.0, norm='L2', steps=1, eps_units='255', **extra)
    )
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        attack.run(net, images, labels)


# ------------------------------------------------------------ model in train mode
class _BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout2d(0.5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.drop(self.bn(self.conv(x)))


class _View:
    """A model view holding its module as ``.model`` (like SegmentorPixelView)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x):
        return self.model(x)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize('wrap', [False, True], ids=['module', 'view'])
@pytest.mark.parametrize('cfg', CONFIGS, ids=lambda c: c['type'] + str(len(c)))
def test_train_mode_model_is_attacked_in_eval_mode(cfg, wrap, attack_models):
    net = _BNNet().requires_grad_(False)
    x, y = attack_models.batch(net=net.eval())
    net.train()
    net.drop.eval()  # a mixed state is restored as it was
    before = _state(net)
    attack = ATTACKS.build(dict(cfg, eps=8))
    model = _View(net) if wrap else net
    with pytest.warns(AttackWarning, match='the model is in train mode'):
        out = attack.run(model, x, y, seeds=[1, 2, 3, 4])
    after = _state(net)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k  # BatchNorm buffers untouched
    assert net.training and net.bn.training and not net.drop.training
    # the attack saw the eval-mode model: same result as attacking it in eval mode
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ref = attack.run(model, x, y, seeds=[1, 2, 3, 4])
    assert torch.equal(out.adv_images, ref.adv_images)
    assert not net.training


def test_plain_callable_is_left_alone(problem):
    net, x, y = problem
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ATTACKS.build(dict(type='PGD', eps=8, steps=2)).run(lambda t: net(t), x, y)


def test_attack_names_tell_attacks_of_one_class_apart():
    """Results are recorded under an attack's ``name``: by default the class and
    the objective, so two APGDs with different losses, or PGD beside the SegPGD
    preset, have different names; ``name=`` overrides it."""
    build = ATTACKS.build
    assert build(dict(type='APGD', loss='CE')).name == 'APGD-CE'
    assert build(dict(type='APGD', loss='JS-Avg')).name == 'APGD-JS-Avg'
    assert build(dict(type='PGD')).name == 'PGD-CE'
    assert build(dict(type='PGD', loss='SegPGD')).name == 'PGD-SegPGD'
    assert build(dict(type='FGSM')).name == 'FGSM-CE'
    assert build(dict(type='BIM', loss='Mask-CE')).name == 'BIM-Mask-CE'
    assert build(dict(type='APGDLargeEps', loss='JS-Avg')).name == (
        'APGDLargeEps-JS-Avg'
    )
    named = build(dict(type='APGD', loss='CE', steps=50, name='APGD-50'))
    assert named.name == 'APGD-50' and named.record_names() == ['APGD-50']
    # an ensemble records its members; a name prefixes them
    sea = SEA(class_weights=WEIGHTS)
    assert sea.record_names() == ['APGD-Mask-CE-Bal', 'APGD-Mask-CE', 'APGD-JS-Avg']
    sea = SEA(class_weights=WEIGHTS, name='SEA-100')
    assert sea.record_names() == [
        'SEA-100:APGD-Mask-CE-Bal',
        'SEA-100:APGD-Mask-CE',
        'SEA-100:APGD-JS-Avg',
    ]
    for bad in ('', 'a/b', 3):
        with pytest.raises(ValueError, match='name must be a non-empty string'):
            build(dict(type='PGD', name=bad))


@pytest.mark.parametrize('kind', ['SEA', 'APGDLargeEps'])
def test_run_is_reentrant_progress_is_not_kept_on_the_attack(problem, kind):
    """A run keeps nothing of a call on the attack (nor on SEA's members): a run
    of the same attack nested in the model's forward leaves the outer run's
    progress and result as they are, and a repeated run gives the same."""
    net, x, y = problem
    cfg = dict(type=kind, eps=8, steps=6)
    if kind == 'SEA':
        cfg['class_weights'] = WEIGHTS
    attack = ATTACKS.build(cfg)
    seen_alone = []
    alone = attack.run(net, x, y, seeds=[1, 2, 3, 4], progress=seen_alone.append)

    nested, inner_seen = [], []

    def view(images):
        if not nested:  # once, at the outer run's first forward
            nested.append(
                attack.run(net, x, y, seeds=[1, 2, 3, 4], progress=inner_seen.append)
            )
        return net(images)

    seen = []
    out = attack.run(view, x, y, seeds=[1, 2, 3, 4], progress=seen.append)
    assert seen == seen_alone and inner_seen == seen_alone
    assert torch.equal(out.adv_images, alone.adv_images)
    assert torch.equal(nested[0].adv_images, alone.adv_images)
    # nothing of a call stays on the attack or its members
    for a in (attack, *getattr(attack, 'attacks', {}).values()):
        assert not any('progress' in k for k in vars(a)), vars(a).keys()
