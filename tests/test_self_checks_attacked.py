"""Self-checks around the attacks (docs/flags.md): ``robust_above_clean`` on the
worst case only, ``zero_gradients`` on labelled images only, non-finite logits
at attacked points, invalid adversarial images, ``dynamic_model`` and
``prediction_mismatch``; the clean image as a worst-case candidate. Each flag
fires on a tiny model or record set built to have the problem and stays silent
on a normal one."""

import pytest
import torch
import torch.nn as nn

from mmseg_robust.attacks import PGD, SEA
from mmseg_robust.evaluation import counts_of_batch, image_record, summarize_records
from mmseg_robust.evaluation.robustness_metric import format_above_clean
from mmseg_robust.evaluation.self_checks import (
    LogitsWatch,
    SelfCheckError,
    above_clean_counts,
    check_adversarial_images,
    check_attacked_logits,
    check_dynamic_model,
    check_recorded_prediction,
    check_robust_above_clean,
    forward_calls_autograd,
    pre_attack_checks,
)

K = 4
WEIGHTS = [0.1, 0.2, 0.3, 0.4]


@pytest.fixture
def net(attack_models, attack_one_thread):
    return attack_models.tiny_net(num_classes=K, seed=0)


@pytest.fixture
def batch(attack_models, net):
    return attack_models.batch(b=3, h=8, w=8, num_classes=K, seed=1, net=net)


def codes(flags):
    return sorted(f.code for f in flags if f)


def _bare_loop():
    """The evaluation's self-check methods without a Runner."""
    from mmseg_robust.evaluation.evaluator import SelfCheckRun

    return SelfCheckRun()


# ------------------------------------------------------------ zero gradients
def test_zero_gradients_skips_images_without_labelled_pixels(net, batch):
    images, labels = batch
    labels = labels.clone()
    labels[0] = 255  # every pixel ignored: CE 0, gradient 0 by construction
    assert pre_attack_checks(net, images, labels) == []

    def quantised_second(x):
        # image 1 (labelled) goes through a non-differentiable rounding
        return net(torch.cat([x[:1], x[1:2].detach().round(), x[2:]]))

    flags = pre_attack_checks(quantised_second, images, labels)
    assert codes(flags) == ['zero_gradients']
    assert flags[0].details == dict(zero_images=1, images=2, images_without_labels=1)
    assert '1 of 2 images with labelled pixels' in flags[0].message


# -------------------------------------------------------- robust_above_clean
def _acc_record(key, clean, attacks, eps='4'):
    return dict(
        key=key,
        num_classes=K,
        clean=dict(correct=clean, valid=100),
        attacks={eps: {n: dict(correct=c, valid=100) for n, c in attacks.items()}},
    )


def _demo_like_records():
    """24 images, SEA's three attacks; on one image one attack ends above
    clean but another does not (the demo's PIR-AT model at 4/255)."""
    names = ['APGD-Mask-CE-Bal', 'APGD-Mask-CE', 'APGD-JS-Avg']
    records = [
        _acc_record(f'img{i}', 95, dict(zip(names, (90, 88, 91)))) for i in range(23)
    ]
    records.append(_acc_record('img23', 97, dict(zip(names, (96, 98, 95)))))
    return records


def test_one_attack_above_clean_is_information_not_a_flag():
    records = _demo_like_records()
    assert check_robust_above_clean(records) is None
    counts = above_clean_counts(records)['4']
    assert counts['images'] == 24 and counts['worst_case'] == 0
    assert counts['attacks'] == {
        'APGD-Mask-CE-Bal': 0,
        'APGD-Mask-CE': 1,
        'APGD-JS-Avg': 0,
    }


def test_worst_case_above_clean_is_flagged():
    records = _demo_like_records()
    # every attack above clean on one image: the worst case is too
    records[5] = _acc_record(
        'img5',
        50,
        {'APGD-Mask-CE-Bal': 55, 'APGD-Mask-CE': 70, 'APGD-JS-Avg': 51},
    )
    flag = check_robust_above_clean(records)
    assert flag.code == 'robust_above_clean' and flag.level == 'warning'
    eps = flag.details['eps']['4']
    assert eps['worst_case'] == 1 and eps['worst_case_images'] == ['img5']
    assert eps['attacks']['APGD-Mask-CE'] == 2
    assert 'the worst case on 1/24 images (4.2%' in flag.message


def test_single_attack_above_clean_on_a_stated_share_of_images():
    # a single attack: 1 of 24 above clean (4.2%) is within 5%; 2 (8.3%) not
    records = [_acc_record(f'img{i}', 90, dict(PGD=40)) for i in range(24)]
    records[0] = _acc_record('img0', 90, dict(PGD=95))
    assert check_robust_above_clean(records) is None
    records[1] = _acc_record('img1', 90, dict(PGD=91))
    flag = check_robust_above_clean(records)
    assert flag.details['eps']['4']['worst_case'] == 2
    assert 'more than 5% of the images' in flag.message
    assert check_robust_above_clean(records, single_attack_share=0.1) is None


class BetterOffClean(nn.Module):
    """Per pixel: class 1 (the label) unless the pixel is exactly the clean
    value 0.5 in every channel, then class 0: any perturbation helps."""

    def forward(self, x):
        at_clean = (x == 0.5).all(1, keepdim=True).float()
        smooth = 0.01 * x.mean(1, keepdim=True)  # a gradient for the attacks
        return torch.cat([5 * at_clean + smooth, 1 - smooth, -smooth, -smooth], 1)


def _records_of(model, attack, images, labels, eps='4'):
    out = attack.run(model, images, labels, seeds=list(range(len(images))))
    clean = counts_of_batch(model(images).argmax(1), labels, K, 255)
    per_attack = [
        counts_of_batch(o.adv_pred, labels, K, 255)
        for o in out.by_attack(type(attack).__name__).values()
    ]
    names = list(out.by_attack(type(attack).__name__))
    return [
        image_record(
            f'img{i}', K, clean[i], {eps: {n: c[i] for n, c in zip(names, per_attack)}}
        )
        for i in range(len(images))
    ]


def test_robust_above_clean_fires_on_a_model_whose_worst_case_is_above_clean(
    attack_one_thread,
):
    images = torch.full((2, 3, 6, 6), 0.5)
    labels = torch.ones(2, 6, 6, dtype=torch.long)
    sea = SEA(eps=4, steps=3, class_weights=WEIGHTS)
    records = _records_of(BetterOffClean().eval(), sea, images, labels)
    assert all(r['clean']['correct'] == 0 for r in records)
    flag = check_robust_above_clean(records)
    assert flag is not None and flag.details['eps']['4']['worst_case'] == 2
    # the clean image as a worst-case candidate: never above clean per image
    summary = summarize_records(records, ['best', 'reference'], clean_candidate=True)
    worst = summary['eps']['4']['worst_case']
    assert worst['aAcc_img'] == 0.0 and worst['mIoU_best'] == 0.0
    assert worst['clean_candidate'] is True
    plain = summarize_records(records, ['best', 'reference'])['eps']['4']
    assert plain['worst_case']['aAcc_img'] == 100.0
    # 'reference' keeps the SEA reference's candidates, the attacks only
    assert worst['mIoU_reference'] == plain['worst_case']['mIoU_reference']
    assert plain['above_clean']['worst_case'] == 2
    assert 'worst case 2' in format_above_clean(summarize_records(records, ['best']))


def test_clean_candidate_changes_nothing_where_the_attacks_beat_clean(
    net, attack_models
):
    images, labels = attack_models.batch(b=4, h=8, w=8, num_classes=K, seed=3, net=net)
    sea = SEA(eps=8, steps=5, class_weights=WEIGHTS)
    records = _records_of(net, sea, images, labels, eps='8')
    assert above_clean_counts(records)['8']['worst_case'] == 0
    with_clean = summarize_records(records, ['best', 'reference'], clean_candidate=True)
    plain = summarize_records(records, ['best', 'reference'])
    for key in ('aAcc_img', 'mIoU_best', 'mIoU_reference'):
        assert (
            with_clean['eps']['8']['worst_case'][key]
            == plain['eps']['8']['worst_case'][key]
        )
    assert format_above_clean(plain) == ''


def test_metric_option_clean_candidate(tmp_path):
    from mmseg_robust.evaluation import RobustnessMetric

    def counts(correct):
        return dict(
            intersect=[correct, 0, 0, 0],
            union=[100, 100 - correct, 0, 0],
            label_area=[100, 0, 0, 0],
            correct=correct,
            valid=100,
        )

    records = [
        dict(
            key='a', num_classes=K, clean=counts(60), attacks={'8': {'A': counts(80)}}
        ),
        dict(
            key='b', num_classes=K, clean=counts(90), attacks={'8': {'A': counts(10)}}
        ),
    ]
    metric = RobustnessMetric(worst_case_modes=['best'], clean_candidate=True)
    assert metric.compute_metrics(records)['eps8/SEA/aAcc'] == 35.0  # (60 + 10) / 2
    metric = RobustnessMetric(worst_case_modes=['best'])
    assert metric.compute_metrics(records)['eps8/SEA/aAcc'] == 45.0  # (80 + 10) / 2
    # a single attack above clean on 1 of 2 images (50% > 5%): flagged
    assert 'robust_above_clean' in codes(metric.flags)


class _View:
    """A model view with its clean images and labels, as the loop sees it."""

    def __init__(self, model, images, labels):
        self.model, self.images, self.labels = model, images, labels

    def __call__(self, x):
        return self.model(x)


# ------------------------------------------------ non-finite attacked points
class NaNOffClean(nn.Module):
    """Finite logits at the clean images, NaN anywhere else."""

    def __init__(self, net, clean):
        super().__init__()
        self.net = net
        self.register_buffer('clean', clean.clone())

    def forward(self, x):
        out = self.net(x)
        is_clean = (x[:, None] == self.clean[None]).flatten(2).all(2).any(1)
        nan = torch.full_like(out, float('nan'))
        return torch.where(is_clean[:, None, None, None], out, nan)


def test_nonfinite_logits_at_attacked_points_is_an_error(net, batch):
    images, labels = batch
    model = NaNOffClean(net, images).eval()
    assert pre_attack_checks(model, images, labels) == []  # finite at clean
    watch = LogitsWatch(_View(model, images, labels))
    attack = PGD(eps=8, steps=2)
    out = attack.run(watch, images, labels, seeds=[0, 1, 2])
    assert watch.forwards == 3 and watch.nonfinite_forwards() == 3
    keys = ['a.png', 'b.png', 'c.png']
    flag = check_attacked_logits(watch.nonfinite_forwards(), 3, 'PGD', '8', keys)
    assert flag.code == 'nonfinite_logits' and flag.level == 'error'
    assert '3 of 3 forward passes of PGD at eps 8' in flag.message
    assert 'a.png' in flag.message
    # the loop raises it after the attack, before the records are kept
    with pytest.raises(SelfCheckError, match='nonfinite_logits'):
        _bare_loop().after_attack(watch, out, 'PGD', attack, '8', keys)
    # a normal model: silent
    watch = LogitsWatch(_View(net, images, labels))
    out = attack.run(watch, images, labels, seeds=[0, 1, 2])
    assert watch.nonfinite_forwards() == 0
    loop = _bare_loop()
    loop.after_attack(watch, out, 'PGD', attack, '8', keys)
    assert loop.flags == []


# --------------------------------------------- invalid adversarial images
def test_invalid_adversarial_images(net, batch):
    images, labels = batch
    r = 8 / 255
    adv = PGD(eps=8, steps=2).run(net, images, labels, seeds=[0, 1, 2]).adv_images
    for norm in ('Linf', 'L2'):
        assert check_adversarial_images(adv, images, r * 100, norm, 'PGD', '8') is None
    assert check_adversarial_images(adv, images, r, 'Linf', 'PGD', '8') is None
    outside = (images + 2 * r * torch.sign(torch.randn_like(images))).clamp(0, 1)
    flag = check_adversarial_images(outside, images, r, 'Linf', 'PGD', '8')
    assert flag.code == 'invalid_adversarial_images' and flag.level == 'error'
    assert flag.details['outside_ball'] == 3
    bad = adv.clone()
    bad[0, 0, 0, 0] = float('nan')
    bad[1, 0, 0, 0] = 1.5
    flag = check_adversarial_images(bad, images, 1.0, 'Linf', 'X', '8')
    assert flag.details['nonfinite'] == 1 and flag.details['out_of_range'] == 1
    l2 = images.clone()
    l2[0] += 0.9 * r / l2[0].numel() ** 0.5  # inside the L2 ball
    assert check_adversarial_images(l2.clamp(0, 1), images, r, 'L2', 'X', '8') is None
    l2[1, 0] = (l2[1, 0] + 0.5).clamp(0, 1)
    flag = check_adversarial_images(l2.clamp(0, 1), images, r, 'L2', 'X', '8')
    assert flag.details['outside_ball'] == 1


# ------------------------------------------------------------ dynamic model
class Adapting(nn.Module):
    """Changes a parameter at every forward (test-time adaptation)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.shift = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x):
        self.shift += 0.5
        return self.net(x) + self.shift * torch.arange(K).view(1, K, 1, 1)


class Purifying(nn.Module):
    """Deterministic, but optimises its input inside forward (one gradient
    step on the entropy), as an input-purification defence does."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            p = self.net(z).softmax(1)
            entropy = -(p * p.clamp_min(1e-12).log()).sum()
            (g,) = torch.autograd.grad(entropy, z)
        return self.net(x - 0.01 * g.sign())


class PurifyingByBackward(Purifying):
    """The same step through ``Tensor.backward``."""

    def forward(self, x):
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            p = self.net(z).softmax(1)
            (-(p * p.clamp_min(1e-12).log()).sum()).backward()
        return self.net(x - 0.01 * z.grad.sign())


def test_dynamic_model(net, batch):
    images, labels = batch
    first = net(images)
    second, calls = forward_calls_autograd(net, images)
    assert calls == [] and check_dynamic_model(first, second, calls, '8') is None
    model = Adapting(net)
    with torch.no_grad():
        first = model(images)
    second, calls = forward_calls_autograd(model, images)
    flag = check_dynamic_model(first, second, calls, '8')
    assert flag.code == 'dynamic_model' and 'differ' in flag.message
    model = Purifying(net)
    with torch.no_grad():
        first = model(images)
    second, calls = forward_calls_autograd(model, images)
    assert calls == ['grad'] and torch.equal(first, second)
    flag = check_dynamic_model(first, second, calls, '8')
    assert flag.code == 'dynamic_model' and 'torch.autograd.grad' in flag.message
    second, calls = forward_calls_autograd(PurifyingByBackward(net), images)
    assert calls == ['backward']


# ------------------------------------------------------- prediction mismatch
def test_prediction_mismatch(net, batch):
    images, labels = batch
    logits = net(images)
    pred = logits.argmax(1)
    valid = labels != 255
    assert check_recorded_prediction(pred, logits, valid, '8') is None
    other = (pred + 1) % K
    flag = check_recorded_prediction(other, logits, valid, '8')
    assert flag.code == 'prediction_mismatch' and flag.details['images'] == 3
    # one pixel of 192 is above the 0.1% tolerance; ignored pixels do not count
    one = pred.clone()
    one[0, 0, 0] = (one[0, 0, 0] + 1) % K
    assert check_recorded_prediction(one, logits, valid, '8') is not None
    valid[0, 0, 0] = False
    assert check_recorded_prediction(one, logits, valid, '8') is None
    # near-ties (float noise at adversarial points) are no mismatch, nor a
    # dynamic model
    tied = torch.tensor([2.0, 2.0, -1.0, -1.0]).view(1, K, 1, 1).repeat(1, 1, 10, 10)
    other = tied.clone()
    tied[:, 1] += 1e-6  # class 1 wins by float noise on every pixel
    other[:, 0] += 1e-6  # class 0 does
    zeros = torch.zeros(1, 10, 10, dtype=torch.long)
    assert check_recorded_prediction(zeros, tied, None, '8') is None
    assert check_dynamic_model(tied, other, (), '8') is None
    tied[:, 1] += 0.5
    assert check_recorded_prediction(zeros, tied, None, '8') is not None
    assert check_dynamic_model(tied, other, (), '8') is not None


def test_returned_image_checks_in_the_loop(net, batch):
    images, labels = batch
    out = PGD(eps=8, steps=2).run(net, images, labels, seeds=[0, 1, 2])
    worst = (out.adv_images, out.adv_pred)
    loop = _bare_loop()
    loop.returned_images(_View(net, images, labels), *worst, '8', 255)
    assert loop.flags == []
    loop.returned_images(_View(Adapting(net), images, labels), *worst, '8', 255)
    assert codes(loop.flags) == ['dynamic_model', 'prediction_mismatch']


# ------------------------------------------------------ evaluator options
def test_evaluator_options_eps_units_and_clean_candidate(small_config):
    from mmengine.config import Config

    from mmseg_robust.engine.presets import apply_robustness_evaluator

    cfg = Config.fromfile(small_config)
    spec = dict(type='PGD', eps_units=255, clean_candidate='true')
    apply_robustness_evaluator(cfg, spec)
    assert cfg.test_cfg.attacks[0]['eps_units'] == '255'
    assert cfg.test_evaluator.clean_candidate is True
    cfg = Config.fromfile(small_config)
    apply_robustness_evaluator(cfg, dict(type='PGD'))
    assert 'eps_units' not in cfg.test_cfg.attacks[0]
    assert not cfg.test_evaluator.get('clean_candidate', False)


@pytest.fixture(scope='module')
def random_checkpoint(small_config, tmp_path_factory):
    """The small config's model with its random initial weights."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from mmseg_robust.registry import MODELS

    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(small_config).model)
    ckpt = str(tmp_path_factory.mktemp('random_ckpt') / 'random.pth')
    torch.save(dict(state_dict=model.state_dict(), meta={}), ckpt)
    return ckpt


@pytest.mark.parametrize('confirmed', [False, True])
def test_confirmed_eps_units_leave_no_flag_in_the_results_file(
    confirmed,
    run_tool,
    small_config,
    random_checkpoint,
    synthetic_root,
    data_options,
    tmp_path,
):
    """tools/test.py with an L-inf eps of 8/255 (meant as 8): an
    ``attack_warning`` in the results file unless confirmed; the checks
    around the attacks (finite logits at attacked points, valid adversarial
    images, dynamic_model, prediction_mismatch) stay silent on a normal
    model."""
    import glob
    import json
    import os.path as osp

    work = str(tmp_path / 'work')
    run_tool(
        ['python', 'tools/test.py', small_config, random_checkpoint]
        + ['--work-dir', work, '--cfg-options', 'evaluator.type=PGD']
        + [f'evaluator.eps={8 / 255}', 'evaluator.steps=2', 'evaluator.resume=False']
        + (['evaluator.eps_units=255'] if confirmed else [])
        + ['test_dataloader.dataset.indices=2', 'test_dataloader.batch_size=2']
        + data_options(synthetic_root)
    )
    (path,) = glob.glob(osp.join(work, 'robustness_*.json'))
    with open(path) as f:
        flags = {f['code']: f for f in json.load(f)['flags']}
    assert ('attack_warning' in flags) is not confirmed, flags
    if not confirmed:
        assert 'did you mean eps=8 ' in flags['attack_warning']['message']
    quiet = {
        'nonfinite_logits',
        'invalid_adversarial_images',
        'dynamic_model',
        'prediction_mismatch',
    }
    assert not quiet & set(flags), flags


def test_report_drops_an_earlier_rule_flag_without_a_worst_case_above_clean(tmp_path):
    """A results file of the earlier rule (the demo's PIR-AT: one attack above
    clean on 1 of 24 images, worst case 0) is reported without the flag; a
    worst case above clean is still listed."""
    from mmseg_robust.reporting import load_result, write_report

    def result(eps_details):
        return dict(
            schema_version=3,
            summary=dict(
                num_images=24,
                clean=dict(mIoU=72.8, aAcc=95.0, aAcc_img=95.8),
                eps={'4': dict(worst_case=dict(mIoU=55.1, aAcc_img=91.7))},
            ),
            attacks=[dict(type='SEA', steps=100)],
            flags=[
                dict(
                    code='robust_above_clean',
                    level='warning',
                    message='attacks ended above the clean pixel accuracy',
                    fix='run more iterations',
                    details=dict(images=24, eps=eps_details),
                )
            ],
        )

    old = result({'4': dict(images=1, worst_case=0, attacks={'APGD-Mask-CE': 1})})
    row = load_result(old, name='PIR-AT')
    assert row['flags'] == []
    md = write_report([row], str(tmp_path / 'r'), print_table=False)['markdown']
    text = open(md).read()
    assert 'no flags raised' in text and 'not be trustworthy' not in text
    worst = result({'4': dict(images=1, worst_case=1, attacks={'APGD-Mask-CE': 1})})
    assert [f['code'] for f in load_result(worst)['flags']] == ['robust_above_clean']


def test_nan_off_the_clean_images_stops_the_evaluation(
    small_config,
    random_checkpoint,
    synthetic_root,
    data_options,
    tools_in_one_process,
    reset_mmengine,
    monkeypatch,
    tmp_path,
):
    """tools/test.py on a model whose logits are NaN anywhere but at the clean
    images: an error naming nonfinite_logits after the first attack, and no
    record of the batch is cached or written (before: an empty flags list and
    a 'successful' attack)."""
    import glob
    import os.path as osp

    from mmseg_robust.models import SegmentorPixelView

    forward = SegmentorPixelView.__call__

    def nan_off_clean(self, images):
        logits = forward(self, images)
        if images.shape == self.images.shape and torch.equal(images, self.images):
            return logits
        return logits * float('nan')

    monkeypatch.setattr(SegmentorPixelView, '__call__', nan_off_clean)
    work = str(tmp_path / 'work')
    argv = (
        ['tools/test.py', small_config, random_checkpoint, '--work-dir', work]
        + ['--cfg-options', 'evaluator.type=PGD', 'evaluator.eps=8']
        + ['evaluator.steps=2', 'test_dataloader.dataset.indices=2']
        + ['test_dataloader.batch_size=2']
        + data_options(synthetic_root)
    )
    with pytest.raises(SelfCheckError, match=r'nonfinite_logits.*PGD-CE at eps 8'):
        tools_in_one_process.main(argv)
    assert not glob.glob(osp.join(work, 'robustness_*.json'))
    cached = [
        p
        for p in glob.glob(osp.join(work, 'robustness_cache', '**'), recursive=True)
        if osp.isfile(p) and osp.getsize(p)
    ]
    for path in cached:
        with open(path) as f:
            text = f.read()
        assert '"clean"' not in text and '"counts"' not in text, path
