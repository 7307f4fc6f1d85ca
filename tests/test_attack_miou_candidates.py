"""mIoU candidates: a second iterate per attack for SEA's worst-case mIoU
(docs/algorithms.md section 4.2)."""

import pytest
import torch

from mmseg_robust.attacks import APGD, SEA, APGDLargeEps
from mmseg_robust.attacks.apgd import MIOU_CANDIDATE_SUFFIX
from mmseg_robust.attacks.seg_logits import image_miou
from mmseg_robust.registry import ATTACKS

pytestmark = pytest.mark.usefixtures('attack_one_thread')

WEIGHTS = [0.1, 0.2, 0.3, 0.4]
NAMES = ['APGD-Mask-CE-Bal', 'APGD-Mask-CE', 'APGD-JS-Avg']


def test_image_miou_by_hand():
    labels = torch.tensor([[[0, 0], [1, 2]], [[3, 3], [3, 0]], [[1, 1], [1, 1]]])
    pred = torch.tensor([[[0, 1], [1, 1]], [[3, 0], [3, 3]], [[0, 0], [0, 0]]])
    valid = torch.ones(3, 2, 2, dtype=torch.bool)
    valid[1, 1, 1] = False  # its label-0 pixel does not count
    valid[2] = False  # no valid pixel
    got = image_miou(pred, labels, valid, 4)
    # image 0: class 0 1/2, class 1 1/3 (one hit, union 3), class 2 0/1
    # image 1: class 3 2/3, class 0 0/1 (predicted once, no label 0 left)
    assert got.dtype == torch.float64
    assert torch.allclose(
        got, torch.tensor([(1 / 2 + 1 / 3 + 0) / 3, (2 / 3 + 0) / 2, 0.0]).double()
    )


def _iterate_scores(net, inputs, y, valid):
    """Per recorded input (rows: forwards) and image, the image's own mIoU."""
    with torch.no_grad():
        return torch.stack([image_miou(net(x).argmax(1), y, valid, 4) for x in inputs])


@pytest.mark.parametrize('attack_cls', [APGD, APGDLargeEps])
def test_the_candidate_is_the_iterate_of_lowest_own_miou(attack_cls, attack_models):
    """Every forward of the (last) run is an iterate; the candidate is, per
    image, the newest one with the lowest own mIoU, with its prediction; the
    attack's own output and passes are those of the attack without it."""
    net = attack_models.tiny_net()
    x, y = attack_models.batch(4, 8, 8, net=net, seed=5)
    seeds = [5, 6, 7, 8]
    kw = dict(eps=8, steps=10, loss='CE', early_stop=False, eps_units='255')
    plain = attack_cls(**kw).run(net, x, y, seeds=seeds)
    rec = attack_models.Recorder(net)
    attack = attack_cls(**kw, miou_candidate=True, name='A')
    out = attack.run(rec, x, y, seeds=seeds)
    assert attack.record_names() == ['A', 'A' + MIOU_CANDIDATE_SUFFIX]
    assert list(out.members) == attack.record_names()
    own, cand = out.members.values()
    for o in (out, own):
        assert torch.equal(o.adv_images, plain.adv_images)
        assert torch.equal(o.adv_pred, plain.adv_pred)
        assert torch.equal(o.stats['passes'], plain.stats['passes'])
    assert out.worst_member.tolist() == [0, 0, 0, 0]
    assert cand.stats['passes'].tolist() == [0, 0, 0, 0]
    assert cand.stats['forwards'].tolist() == [0, 0, 0, 0]
    # the last run's iterates: its first forward (the stage's start) to the
    # last iterate; the final forward re-evaluates the returned point
    last_run = attack.steps if attack_cls is APGD else attack.stages[-1][0]
    iterates = rec.inputs[-(last_run + 2) : -1]
    valid = torch.ones_like(y, dtype=torch.bool)
    scores = _iterate_scores(net, iterates, y, valid)
    lowest = scores.min(0).values
    assert (image_miou(cand.adv_pred, y, valid, 4) == lowest).all()
    for i in range(x.shape[0]):
        t = int(torch.nonzero(scores[:, i] == lowest[i]).max())  # ties: newer
        assert torch.equal(cand.adv_images[i], iterates[t][i])
        with torch.no_grad():
            assert torch.equal(cand.adv_pred[i], net(iterates[t])[i].argmax(0))
    # on this problem the candidate is another point for some image, with a
    # lower own mIoU than the returned one
    own_scores = image_miou(own.adv_pred, y, valid, 4)
    assert (lowest < own_scores).any() and (lowest <= own_scores).all()
    attack_models.assert_feasible(cand.adv_images, x, 8, 'Linf')


@pytest.fixture
def mixed(attack_models):
    """6 images of 6 x 6 whose APGD runs end at different iterations: images
    2 and 3 have 3 valid pixels (image 3 reaches accuracy 0 and leaves), the
    last is at accuracy 0 from the start (its correct pixels ignored)."""
    net = attack_models.tiny_net()
    x, y = attack_models.batch(6, 6, 6, net=net, seed=1)
    wrong = net(x[5:]).argmax(1) != y[5:]
    y[5:] = torch.where(wrong, y[5:], 255)
    y[2:4, 1:, :] = 255
    y[2:4, 0, 3:] = 255
    return net, x, y


def test_candidates_are_batch_independent_when_images_leave(mixed):
    net, x, y = mixed
    attack = APGDLargeEps(eps=16, steps=20, loss='CE', miou_candidate=True)
    seeds = list(range(6))
    full = attack.run(net, x, y, seeds=seeds)
    name = attack.name + MIOU_CANDIDATE_SUFFIX
    cand = full.members[name]
    # images 3 and 5 reached accuracy 0 and left the batch early
    left = ((full.adv_pred == y) & (y != 255)).flatten(1).sum(1) == 0
    assert left.tolist() == [False, False, False, True, False, True]
    assert (full.stats['passes'][[3, 5]] < 20).all()
    for i in range(x.shape[0]):
        one = attack.run(net, x[i : i + 1], y[i : i + 1], seeds=seeds[i : i + 1])
        assert torch.allclose(one.members[name].adv_images[0], cand.adv_images[i])
        assert torch.equal(one.members[name].adv_pred[0], cand.adv_pred[i])


def test_sea_records_each_member_beside_its_candidate(mixed, attack_models):
    """SEA(miou_candidates=True): the members, the refinement and the
    returned worst case are SEA's own; each is followed by its candidate,
    which spends no pass and whose own mIoU is never higher."""
    net, x, y = mixed
    seeds = list(range(6))
    kw = dict(eps=16, n_iter=10, class_weights=WEIGHTS, refine_steps=4)
    plain = SEA(**kw).run(net, x, y, seeds=seeds)
    sea = SEA(**kw, miou_candidates=True)
    out = sea.run(net, x, y, seeds=seeds)
    own = NAMES + ['Refine']
    names = [n for m in own for n in (m, m + MIOU_CANDIDATE_SUFFIX)]
    assert sea.record_names() == names and list(out.members) == names
    assert 'miou_candidates=True' in repr(sea)
    assert torch.equal(out.adv_images, plain.adv_images)
    assert torch.equal(out.stats['passes'], plain.stats['passes'])
    valid = y != 255
    for i in range(x.shape[0]):
        assert out.source('SEA', i) == plain.source('SEA', i)
    for m in own:
        mine, cand = out.members[m], out.members[m + MIOU_CANDIDATE_SUFFIX]
        assert torch.equal(mine.adv_images, plain.members[m].adv_images)
        assert torch.equal(mine.stats['passes'], plain.members[m].stats['passes'])
        assert cand.stats['passes'].tolist() == [0] * 6
        with torch.no_grad():
            assert torch.equal(cand.adv_pred, net(cand.adv_images).argmax(1))
        assert (
            image_miou(cand.adv_pred, y, valid, 4)
            <= image_miou(mine.adv_pred, y, valid, 4)
        ).all()
        attack_models.assert_feasible(cand.adv_images, x, 16, 'Linf')
    # the image at accuracy 0 is not refined: its candidate is its start
    refine = out.members['Refine' + MIOU_CANDIDATE_SUFFIX]
    assert torch.equal(refine.adv_images[5], plain.adv_images[5])
    assert torch.equal(
        out.stats['passes'], sum(o.stats['passes'] for o in out.members.values())
    )


def test_sea_option_errors_and_the_evaluator_option(repo_root):
    import os.path as osp

    from mmengine.config import Config

    from mmseg_robust.engine import apply_robustness_evaluator

    with pytest.raises(ValueError, match="compat='reference'"):
        SEA(class_weights=WEIGHTS, miou_candidates=True, compat='reference')
    path = osp.join(repo_root, 'configs/synthetic/upernet_convnext-micro_synthetic.py')
    cfg = Config.fromfile(path)
    spec = dict(type='SEA', miou_candidates='true', class_weights=WEIGHTS)
    apply_robustness_evaluator(cfg, spec)
    attack = cfg.test_cfg.attacks[0]
    assert attack['miou_candidates'] is True
    sea = ATTACKS.build(dict(attack, eps=8, eps_units='255'))
    assert sea.record_names()[1] == 'APGD-Mask-CE-Bal' + MIOU_CANDIDATE_SUFFIX
    with pytest.raises(ValueError, match='miou_candidates is an option of SEA'):
        apply_robustness_evaluator(
            Config.fromfile(path), dict(type='PGD', miou_candidates=True)
        )


def test_the_evaluator_records_the_candidates_for_the_mIoU_greedy(attack_models):
    """Through the Runner-free evaluator (self-checks on): each candidate is a
    recorded attack with no passes, the worst-case aACC and the returned
    examples are SEA's, and the greedy chooses among twice the candidates."""
    from mmseg_robust.evaluation import RobustnessEvaluator, summarize_records

    net = attack_models.tiny_net()
    x, y = attack_models.batch(4, 8, 8, net=net, seed=5)
    keys = ['a.png', 'b.png', 'c.png', 'd.png']
    sea = dict(type='SEA', steps=6, class_weights=WEIGHTS, eps_units='255')
    results = {}
    for mc in (False, True):
        ev = RobustnessEvaluator(dict(sea, miou_candidates=mc), eps=8, seed=3)
        results[mc] = ev.evaluate(
            attack_models.PixelView(net, x, y), keys, examples=True
        )
    plain, cand = ([r.to_json() for r in results[mc].records] for mc in (False, True))
    for p, c in zip(plain, cand):
        at_p, at_c = p['attacks']['8'], c['attacks']['8']
        assert list(at_c) == [n for m in at_p for n in (m, m + MIOU_CANDIDATE_SUFFIX)]
        for name in at_p:
            assert at_c[name] == at_p[name]
            assert at_c[name + MIOU_CANDIDATE_SUFFIX]['passes'] == 0
    for p, c in zip(results[False].examples, results[True].examples):
        assert p[8.0].attack == c[8.0].attack
        assert torch.equal(p[8.0].adv_image, c[8.0].adv_image)
    s_plain, s_cand = (
        summarize_records(r, worst_case_modes=('best',))['eps']['8']
        for r in (plain, cand)
    )
    assert s_cand['worst_case']['aAcc_img'] == s_plain['worst_case']['aAcc_img']
    assert s_cand['budget'][NAMES[0]]['passes'] == 6
    assert len(s_cand['attacks']) == 2 * len(s_plain['attacks'])
