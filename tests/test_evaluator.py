"""RobustnessEvaluator without a Runner: a tiny torch model behind a pixel-space
view, the worst-case example, restored attacks, the self-checks' flags, attack
names, and the one accuracy convention for images without valid pixels."""

import math

import pytest
import torch

from mmseg_robust.evaluation import (
    ImageCounts,
    ImageRecord,
    RobustnessEvaluator,
    SelfCheckError,
    image_record,
)

K = 4
KEYS = ['a.png', 'b.png', 'c.png']


@pytest.fixture
def net(attack_models, attack_one_thread):
    return attack_models.tiny_net(num_classes=K, seed=0)


@pytest.fixture
def batch(attack_models, net):
    return attack_models.batch(b=3, h=8, w=8, num_classes=K, seed=1, net=net)


def _weak_and_strong():
    return [
        dict(type='PGD', steps=1, name='weak'),
        dict(type='APGD', steps=6, name='strong'),
    ]


def test_records_are_typed_and_keyed_by_float_eps(net, batch, attack_models):
    images, labels = batch
    ev = RobustnessEvaluator(_weak_and_strong(), eps=[4, 8], self_checks=False)
    result = ev.evaluate(attack_models.PixelView(net, images, labels), KEYS)
    assert [r.key for r in result.records] == KEYS
    for rec in result.records:
        assert isinstance(rec, ImageRecord) and isinstance(rec.clean, ImageCounts)
        assert list(rec.attacks) == [4.0, 8.0]
        assert list(rec.attacks[8.0]) == ['weak', 'strong']
        # the JSON record (cache, metric) keys eps as strings, and round-trips
        data = rec.to_json()
        assert list(data['attacks']) == ['4', '8']
        assert data == image_record(rec.key, K, rec.clean.to_json(), data['attacks'])
        assert ImageRecord.from_json(data) == rec
    assert result.examples == [{}, {}, {}]  # not asked for


def test_worst_example_is_the_attack_with_the_lowest_accuracy(
    net, batch, attack_models
):
    images, labels = batch
    ev = RobustnessEvaluator(_weak_and_strong(), eps=8, self_checks=False)
    result = ev.evaluate(
        attack_models.PixelView(net, images, labels), KEYS, examples=True
    )
    for i, (rec, ex) in enumerate(zip(result.records, result.examples)):
        (example,) = ex.values()
        accs = {n: c.accuracy for n, c in rec.attacks[8.0].items()}
        assert example.attack == min(accs, key=accs.get)
        assert example.adv_acc == min(accs.values())
        assert example.clean_acc == rec.clean.accuracy
        # the example's prediction is the one counted, at its image
        (counted,) = ImageCounts.of_batch(
            example.adv_pred[None], labels[i : i + 1], K, 255
        )
        assert counted == rec.attacks[8.0][example.attack]
        assert torch.equal(net(example.adv_image[None]).argmax(1)[0], example.adv_pred)
        assert (example.adv_image - images[i]).abs().max() <= 8 / 255 + 1e-6
        arrays = example.to_numpy()
        assert arrays['adv_image'].shape == (8, 8, 3) and arrays['name'] == 'abc'[i]
    # an ensemble's example names its member
    ev = RobustnessEvaluator(
        dict(type='SEA', steps=2, class_weights=[0.25] * K), eps=8, self_checks=False
    )
    result = ev.evaluate(
        attack_models.PixelView(net, images, labels), KEYS, examples=True
    )
    for rec, ex in zip(result.records, result.examples):
        accs = {n: c.accuracy for n, c in rec.attacks[8.0].items()}
        assert ex[8.0].attack in accs and ex[8.0].adv_acc == min(accs.values())


def test_saved_attacks_are_restored_not_run(net, batch, attack_models):
    """An attack whose counts an interrupted run saved is not run again: its
    saved counts are in the records, the other attacks' are computed as in a
    full run, and that eps has no example."""
    images, labels = batch
    saved_units = {}
    ev = RobustnessEvaluator(_weak_and_strong(), eps=8, self_checks=False)
    full = ev.evaluate(
        attack_models.PixelView(net, images, labels),
        KEYS,
        save=lambda e, j, units: saved_units.setdefault((e, j), units),
    )
    assert sorted(saved_units) == [(8.0, 0), (8.0, 1)]
    for rec, unit in zip(full.records, saved_units[(8.0, 0)]):
        assert unit == {'weak': rec.attacks[8.0]['weak'].to_json()}
    # the saved counts of 'weak', marked so that a rerun would show
    marked = [
        {'weak': dict(u['weak'], correct=0, intersect=[0] * K)}
        for u in saved_units[(8.0, 0)]
    ]
    asked = []

    def saved(e, j):
        asked.append((e, j))
        return marked if j == 0 else None

    ev = RobustnessEvaluator(_weak_and_strong(), eps=8, self_checks=False)
    again = ev.evaluate(
        attack_models.PixelView(net, images, labels), KEYS, examples=True, saved=saved
    )
    assert asked == [(8.0, 0), (8.0, 1)]
    for rec, old, unit in zip(again.records, full.records, marked):
        assert rec.attacks[8.0]['weak'] == ImageCounts.from_json(unit['weak'])
        assert rec.attacks[8.0]['strong'] == old.attacks[8.0]['strong']
        assert rec.clean == old.clean
    assert again.examples == [{}, {}, {}]


class Softmax(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).softmax(1)


def test_flags_once_per_evaluation_and_errors_raise(net, batch, attack_models):
    images, labels = batch
    model = Softmax(net).eval()
    ev = RobustnessEvaluator(dict(type='PGD', steps=1), eps=8)
    first = ev.evaluate(attack_models.PixelView(model, images, labels), KEYS)
    assert 'probability_outputs' in [f.code for f in first.flags]
    second = ev.evaluate(attack_models.PixelView(model, images, labels), KEYS)
    assert second.flags == []  # found already, and the first-batch checks ran
    assert [f.code for f in ev.flags] == [f.code for f in first.flags]
    ev.start()  # a new evaluation finds it again
    assert ev.flags == []
    again = ev.evaluate(attack_models.PixelView(model, images, labels), KEYS)
    assert [f.code for f in again.flags] == [f.code for f in first.flags]
    # a normal model: silent
    ev = RobustnessEvaluator(dict(type='PGD', steps=1), eps=8)
    assert ev.evaluate(attack_models.PixelView(net, images, labels), KEYS).flags == []
    # an error raises before the attack
    bad = labels.clone()
    bad[0, 0, 0] = K
    with pytest.raises(SelfCheckError, match='labels_out_of_range'):
        ev.evaluate(attack_models.PixelView(net, images, bad), KEYS)
    # the checks off: no flags
    ev = RobustnessEvaluator(dict(type='PGD', steps=1), eps=8, self_checks=False)
    assert ev.evaluate(attack_models.PixelView(model, images, labels), KEYS).flags == []


def test_attack_names_are_unique(net):
    with pytest.raises(ValueError, match="record their results as 'PGD-CE'"):
        RobustnessEvaluator([dict(type='PGD'), dict(type='BIM', name='PGD-CE')], eps=8)
    with pytest.raises(ValueError, match="record their results as 'APGD-JS-Avg'"):
        RobustnessEvaluator(
            [
                dict(type='SEA', class_weights=[0.25] * K),
                dict(type='APGDLargeEps', loss='JS-Avg', name='APGD-JS-Avg'),
            ],
            eps=4,
        )
    with pytest.raises(ValueError, match='set eps on the loop'):
        RobustnessEvaluator(dict(type='PGD', eps=8), eps=8)
    with pytest.raises(ValueError, match='at least one attack'):
        RobustnessEvaluator([], eps=8)


def test_an_image_without_valid_pixels_has_no_accuracy(net, batch, attack_models):
    """One convention: NaN (left out of the means over images); its example
    is the first attack's."""
    images, labels = batch
    labels = labels.clone()
    labels[1] = 255
    ev = RobustnessEvaluator(_weak_and_strong(), eps=8, self_checks=False)
    result = ev.evaluate(
        attack_models.PixelView(net, images, labels), KEYS, examples=True
    )
    rec = result.records[1]
    assert rec.clean.valid == 0 and math.isnan(rec.clean.accuracy)
    assert all(math.isnan(c.accuracy) for c in rec.attacks[8.0].values())
    assert result.examples[1][8.0].attack == 'weak'
    assert not math.isnan(result.records[0].clean.accuracy)


def test_probes_flag_masked_gradients_through_the_evaluator(net, batch, attack_models):
    images, labels = batch
    attacks = [dict(type='APGD', steps=5)]
    ev = RobustnessEvaluator(
        attacks,
        eps=8,
        probes=dict(large_radius={}, gradient_free=dict(queries=60, images=2)),
    )
    result = ev.evaluate(
        attack_models.PixelView(attack_models.MaskedGradients(net), images, labels),
        KEYS,
    )
    codes = [f.code for f in result.flags]
    assert 'large_radius_probe' in codes and 'gradient_free_probe' in codes
    probe = next(f for f in result.flags if f.code == 'gradient_free_probe')
    assert len(probe.details['square']) == 2  # the first two images only
    # the probes run on the first attacked batch only
    again = ev.evaluate(
        attack_models.PixelView(attack_models.MaskedGradients(net), images, labels),
        KEYS,
    )
    assert not any(f.code.endswith('_probe') for f in again.flags)
    # and need the self-checks
    with pytest.raises(ValueError, match='self_checks=True'):
        RobustnessEvaluator(attacks, eps=8, self_checks=False, probes=True)


def test_gradient_free_probe_silent_on_an_honest_model(net, batch, attack_models):
    images, labels = batch
    ev = RobustnessEvaluator(
        [dict(type='APGD', steps=10)],
        eps=8,
        probes=dict(gradient_free=dict(queries=60)),
    )
    result = ev.evaluate(attack_models.PixelView(net, images, labels), KEYS)
    assert not any(f.code == 'gradient_free_probe' for f in result.flags)
