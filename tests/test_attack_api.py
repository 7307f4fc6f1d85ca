"""The attack API every attack shares: one iteration argument (``steps``, alias
``n_iter``), the same ``stats`` keys, ensembles reporting their members, and the
progress callback."""

import pytest
import torch

from mmseg_robust.attacks import SEA
from mmseg_robust.attacks.base import STATS_KEYS, resolve_steps
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
    assert set(out.stats) == set(STATS_KEYS)
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
