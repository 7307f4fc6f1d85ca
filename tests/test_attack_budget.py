"""Pass accounting (docs/algorithms.md section 3.6): the forward+backward and
forward-only passes every attack reports per image equal the passes a counting
model view sees, with images leaving a batch early and for an ensemble."""

import pytest
import torch

from mmseg_robust.registry import ATTACKS

pytestmark = pytest.mark.usefixtures('attack_one_thread')

WEIGHTS = [0.1, 0.2, 0.3, 0.4]
CONFIGS = [
    dict(type='FGSM'),
    dict(type='BIM', steps=3),
    dict(type='PGD', steps=3, best_iterate=True),
    dict(type='PGD', steps=3, predict_output=False),
    dict(type='APGD', steps=8),
    dict(type='APGDLargeEps', steps=8),
    dict(type='SEA', steps=8, class_weights=WEIGHTS),
    dict(type='PAdam', steps=3),
]


@pytest.fixture
def problem(attack_models):
    """Three images far apart (the counting view tells them by distance);
    image 0 labelled with another class than the clean prediction everywhere
    and image 1 on a quarter of its pixels, so APGD's images reach accuracy 0
    (and leave the batch) at different iterations."""
    net = attack_models.tiny_net(scale=1.5, seed=0)
    x, y = attack_models.separated_batch(b=3, net=net)
    y[0] = (y[0] + 1) % 4
    y[1, :2] = (y[1, :2] + 1) % 4
    return net, x, y


@pytest.mark.parametrize('cfg', CONFIGS, ids=lambda c: c['type'] + str(len(c)))
def test_reported_passes_are_the_passes_the_model_saw(cfg, problem, attack_models):
    net, x, y = problem
    view = attack_models.ImageCounter(net, x)
    out = ATTACKS.build(dict(cfg, eps=8)).run(view, x, y, seeds=[1, 2, 3])
    assert out.stats['passes'].tolist() == view.passes.tolist()
    assert out.stats['forwards'].tolist() == view.forwards.tolist()
    assert out.stats['passes'].dtype == torch.long
    if cfg['type'] in ('FGSM', 'BIM', 'PGD', 'PAdam'):
        steps = cfg.get('steps', 1)
        assert view.passes.tolist() == [steps] * 3
        # the prediction at the last iterate, and one at the best (PAdam
        # always keeps the best iterate)
        best = cfg.get('best_iterate') or cfg['type'] == 'PAdam'
        forwards = 0 if cfg.get('predict_output') is False else 1 + best
        assert view.forwards.tolist() == [forwards] * 3


def test_apgd_counts_images_that_leave_the_batch_early(problem, attack_models):
    net, x, y = problem
    view = attack_models.ImageCounter(net, x)
    out = ATTACKS.build(dict(type='APGD', eps=8, steps=8)).run(
        view, x, y, seeds=[1, 2, 3]
    )
    passes = out.stats['passes'].tolist()
    assert passes == view.passes.tolist()
    assert passes[0] < 8 and passes[2] == 8  # image 0 left, image 2 did not
    assert out.stats['forwards'].tolist() == view.forwards.tolist()


def test_sea_reports_the_sum_of_its_members_and_its_own_forwards(
    problem, attack_models
):
    net, x, y = problem
    view = attack_models.ImageCounter(net, x)
    sea = ATTACKS.build(dict(type='SEA', eps=8, steps=8, class_weights=WEIGHTS))
    out = sea.run(view, x, y, seeds=[1, 2, 3])
    members = list(out.members.values())
    total = sum(m.stats['passes'] for m in members)
    assert out.stats['passes'].tolist() == total.tolist() == view.passes.tolist()
    # SEA's own statistics: one forward at the clean and one at the worst case
    forwards = sum(m.stats['forwards'] for m in members) + 2
    assert out.stats['forwards'].tolist() == forwards.tolist()
    assert forwards.tolist() == view.forwards.tolist()
    assert len({tuple(m.stats['passes'].tolist()) for m in members}) > 1


def test_evaluator_records_and_summary_carry_the_budget(problem, attack_models):
    from mmseg_robust.evaluation import RobustnessEvaluator, summarize_records

    net, x, y = problem

    ev = RobustnessEvaluator(
        [dict(type='APGD', steps=8), dict(type='PAdam', steps=2)],
        eps=8,
        self_checks=False,
    )
    records = ev.evaluate(
        attack_models.PixelView(net, x, y), ['a.png', 'b.png', 'c.png']
    ).records
    direct = ATTACKS.build(dict(type='APGD', eps=8, steps=8)).run(
        net, x, y, seeds=_seeds(ev)
    )
    for i, rec in enumerate(records):
        assert rec.attacks[8.0]['APGD-CE'].passes == int(direct.stats['passes'][i])
        assert rec.attacks[8.0]['PAdam-CE'].passes == 2
        assert rec.attacks[8.0]['PAdam-CE'].forwards == 2
        assert rec.clean.passes is None and 'passes' not in rec.clean.to_json()
    data = [r.to_json() for r in records]
    assert data[0]['attacks']['8']['PAdam-CE']['passes'] == 2
    budget = summarize_records(data)['eps']['8']['budget']
    apgd = [int(p) for p in direct.stats['passes']]
    assert budget['APGD-CE']['passes'] == pytest.approx(sum(apgd) / 3)
    assert budget['APGD-CE']['passes_max'] == max(apgd)
    assert budget['PAdam-CE'] == dict(
        passes=2.0, passes_max=2, forwards=2.0, forwards_max=2
    )
    # records written before the pass accounting: no budget, still summarised
    for r in data:
        for c in r['attacks']['8'].values():
            del c['passes'], c['forwards']
    assert summarize_records(data)['eps']['8']['budget'] == {}


def _seeds(ev):
    from mmseg_robust.evaluation import image_seed

    return [image_seed(ev.seed, k) for k in ('a.png', 'b.png', 'c.png')]


def test_the_target_counts_subsets_and_refuses_uncounted_batches(attack_models):
    from mmseg_robust.attacks import SegmentationTarget

    net = attack_models.tiny_net()
    x, y = attack_models.batch(b=3, net=net)
    target = SegmentationTarget(net, y)
    target.forward(x)
    sub = target.subset(torch.tensor([0, 2]))
    grad_x = x[[0, 2]].clone().requires_grad_(True)
    torch.autograd.grad(sub.forward(grad_x).sum(), grad_x)
    assert target.counter.forwards.tolist() == [2, 1, 2]
    assert target.counter.backwards.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match='got 2 images.*holds 3.*subset'):
        target.forward(x[:2])
