"""Self-checks of the robustness evaluation (docs/flags.md): every check fires on a
tiny model built to have the problem and stays silent on a normal one; the flags
reach the results file, the log and the report."""

import glob
import json
import os.path as osp
import warnings

import pytest
import torch
import torch.nn as nn

from mmseg_robust.evaluation import RobustnessMetric
from mmseg_robust.evaluation.self_checks import (
    FLAG_CODES,
    Flag,
    SelfCheckError,
    buffer_snapshot,
    check_buffers,
    check_clean_accuracy,
    check_finite_logits,
    check_input_gradients,
    check_labels,
    check_log_probability_outputs,
    check_probability_outputs,
    check_robust_above_clean,
    check_stochastic,
    check_train_mode,
    clean_input_gradient,
    final_checks,
    pre_attack_checks,
    raise_errors,
)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
K = 4


@pytest.fixture
def net(attack_models, attack_one_thread):
    return attack_models.tiny_net(num_classes=K, seed=0)


@pytest.fixture
def batch(attack_models, net):
    return attack_models.batch(b=3, h=8, w=8, num_classes=K, seed=1, net=net)


def codes(flags):
    return sorted(f.code for f in flags if f)


# --------------------------------------------------------------- normal model
def test_normal_model_is_silent(net, batch):
    images, labels = batch
    assert pre_attack_checks(net, images, labels, module=net) == []
    assert check_labels(labels, K, 255, ['a.png', 'b.png', 'c.png']) is None
    before = buffer_snapshot(net)
    net(images)
    assert check_buffers(before, net) is None


# ------------------------------------------------------- stochastic inference
class NoisyHead(nn.Module):
    """Random at inference, like SegNeXt's LightHamHead with rand_init=True."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return out + 0.5 * torch.randn_like(out)


def test_stochastic_inference(net, batch):
    images, labels = batch
    flags = pre_attack_checks(NoisyHead(net).eval(), images, labels)
    assert codes(flags) == ['stochastic_inference']
    assert 'rand_init' in flags[0].fix and 'EOT' in flags[0].fix
    logits = net(images)
    assert check_stochastic(logits, logits.clone()) is None
    # numerical noise far below the tolerance is not randomness
    assert check_stochastic(logits, logits * (1 + 1e-7)) is None


def _tiny_segnext(rand_init):
    """mmseg's SegNeXt-T config, shrunk, random weights."""
    from mmengine.config import ConfigDict
    from mmengine.registry import init_default_scope

    from mmseg_robust.registry import MODELS

    init_default_scope('mmseg')
    model = segnext_model_cfg(num_classes=K)
    model['decode_head']['ham_kwargs']['rand_init'] = rand_init
    return MODELS.build(ConfigDict(model)).eval()


def segnext_model_cfg(num_classes):
    import mmseg
    from mmengine.config import Config

    cfg = Config.fromfile(
        osp.join(
            osp.dirname(mmseg.__file__),
            '.mim',
            'configs',
            'segnext',
            'segnext_mscan-t_1xb16-adamw-160k_ade20k-512x512.py',
        )
    )
    model = cfg.model.to_dict()
    model['backbone'].update(
        init_cfg=None,
        embed_dims=[8, 16, 32, 32],
        depths=[1, 1, 1, 1],
        mlp_ratios=[2, 2, 2, 2],
        drop_path_rate=0.0,
    )
    model['decode_head'].update(
        in_channels=[16, 32, 32], channels=32, ham_channels=32, num_classes=num_classes
    )
    assert model['decode_head']['type'] == 'LightHamHead'
    return model


def _pixel_view(model, n=2, size=64, seed=0):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    from mmseg_robust.models import SegmentorPixelView

    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        s = SegDataSample(
            metainfo=dict(
                img_path=f'img{i}.png', ori_shape=(size, size), img_shape=(size, size)
            )
        )
        s.gt_sem_seg = PixelData(data=torch.randint(0, K, (1, size, size), generator=g))
        samples.append(s)
    inputs = [
        torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        for _ in range(n)
    ]
    return SegmentorPixelView(model, dict(inputs=inputs, data_samples=samples))


def test_segnext_light_ham_head_is_stochastic_unless_rand_init_false(
    attack_one_thread,
):
    torch.manual_seed(0)
    view = _pixel_view(_tiny_segnext(rand_init=True))
    flags = pre_attack_checks(view, view.images, view.labels, module=view.model)
    assert 'stochastic_inference' in codes(flags)
    view = _pixel_view(_tiny_segnext(rand_init=False))
    before = buffer_snapshot(view.model)
    flags = pre_attack_checks(view, view.images, view.labels, module=view.model)
    assert 'stochastic_inference' not in codes(flags), flags
    # the bases buffer it creates at the first forward is not a change
    assert check_buffers(before, view.model) is None


# ------------------------------------------------ train mode / buffers change
class StubbornBN(nn.BatchNorm2d):
    """A BatchNorm that ignores eval() (an overridden train())."""

    def train(self, mode=True):
        return super().train(True)


def _bn_net(bn_cls):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), bn_cls(8), nn.Conv2d(8, K, 1)
    ).eval()


def test_train_mode_and_changing_buffers(batch, attack_one_thread):
    images, labels = batch
    model = _bn_net(StubbornBN)
    before = buffer_snapshot(model)
    flags = pre_attack_checks(model, images, labels, module=model)
    assert 'train_mode' in codes(flags)
    train = [f for f in flags if f.code == 'train_mode'][0]
    assert train.details['modules'] == ['1']
    flag = check_buffers(before, model)
    assert flag.code == 'buffers_changed'
    assert '1.running_mean' in flag.details['buffers']
    assert '1.num_batches_tracked' in flag.details['buffers']


def test_eval_mode_bn_is_silent(batch, attack_one_thread):
    images, labels = batch
    model = _bn_net(nn.BatchNorm2d)
    before = buffer_snapshot(model)
    assert pre_attack_checks(model, images, labels, module=model) == []
    assert check_train_mode(model) is None
    assert check_buffers(before, model) is None


# ------------------------------------------------------ non-finite values
def test_nonfinite_logits_is_an_error(net, batch):
    images, labels = batch

    def nan_model(x):
        out = net(x).clone()
        out[0, 0, 0, 0] = float('nan')
        return out

    flags = pre_attack_checks(nan_model, images, labels)
    assert codes(flags) == ['nonfinite_logits'] and flags[0].level == 'error'
    with pytest.raises(SelfCheckError, match='nonfinite_logits') as err:
        raise_errors(flags)
    assert isinstance(err.value, ValueError)
    assert check_finite_logits(net(images)) is None


def test_nonfinite_gradients(net, batch):
    images, labels = batch  # the batch has exact 0 pixels: sqrt' = inf there

    def sqrt_model(x):
        return net(x) + x.sqrt().mean(1, keepdim=True)

    flags = pre_attack_checks(sqrt_model, images, labels)
    assert codes(flags) == ['nonfinite_gradients']
    assert flags[0].details['nonfinite_images'] == 3
    _, grad = clean_input_gradient(net, images, labels)
    assert check_input_gradients(grad) == []


# ----------------------------------------------------------- zero gradients
def test_zero_gradients_of_a_detached_input_path(net, batch):
    images, labels = batch

    def detached(x):
        return net(x.detach())

    flags = pre_attack_checks(detached, images, labels)
    assert codes(flags) == ['zero_gradients']
    assert 'depend on the input' in flags[0].message


def test_zero_gradients_of_some_images(net, batch):
    images, labels = batch

    def quantised_first(x):
        # image 0 goes through a non-differentiable rounding
        x = torch.cat([x[:1].detach().round(), x[1:]])
        return net(x)

    flags = pre_attack_checks(quantised_first, images, labels)
    assert codes(flags) == ['zero_gradients']
    assert flags[0].details == dict(zero_images=1, images=3, images_without_labels=0)


# ------------------------------------------------------ probability outputs
def test_probability_outputs(net, batch):
    images, labels = batch
    flags = pre_attack_checks(lambda x: net(x).softmax(1), images, labels)
    assert 'probability_outputs' in codes(flags)
    flag = flags[codes(flags).index('probability_outputs')]
    assert 'softmax' in flag.fix and flag.details['kind'] == 'softmax'
    assert check_probability_outputs(net(images)) is None


def test_sigmoid_outputs(net, batch):
    """A sigmoid per class: in [0, 1] but not summing to 1 over the classes."""
    images, labels = batch
    flags = pre_attack_checks(lambda x: net(x).sigmoid(), images, labels)
    assert 'probability_outputs' in codes(flags)
    flag = flags[codes(flags).index('probability_outputs')]
    assert flag.details['kind'] == 'sigmoid' and 'sigmoid' in flag.message
    assert flag.details['max_sum_deviation'] > 1e-3
    # silent: logits, including logits squashed into a range wider than [0, 1]
    assert check_probability_outputs(net(images)) is None
    assert check_probability_outputs(2 * net(images).sigmoid() - 0.5) is None


def test_log_softmax_outputs_are_information_not_a_flag(net, batch, monkeypatch):
    """log p: harmless for the softmax-based losses (softmax(log p) = p), so
    logged as information and never a flag."""
    import mmengine.logging

    logged = []
    monkeypatch.setattr(
        mmengine.logging, 'print_log', lambda msg, **kw: logged.append(msg)
    )
    images, labels = batch
    logits = net(images)
    info = check_log_probability_outputs(logits.log_softmax(1))
    assert info and 'log-probabilities' in info and 'softmax(log p) = p' in info
    # silent on logits (also when all are <= 0), probabilities, sigmoids
    assert check_log_probability_outputs(logits) is None
    assert check_log_probability_outputs(logits - logits.max() - 1) is None
    assert check_log_probability_outputs(logits.softmax(1)) is None
    assert check_log_probability_outputs(logits.sigmoid()) is None
    assert not pre_attack_checks(net, images, labels) and not logged
    flags = pre_attack_checks(lambda x: net(x).log_softmax(1), images, labels)
    assert 'probability_outputs' not in codes(flags)
    assert len(logged) == 1 and 'Self-check information' in logged[0]
    # the softmax-based objectives see the same values and gradients
    from mmseg_robust.attacks.objectives import build_objective

    for loss in ('CE', 'Mask-CE', 'JS-Avg'):
        obj = build_objective(loss)
        assert torch.allclose(
            obj(logits.log_softmax(1), labels), obj(logits, labels), atol=1e-6
        )


# --------------------------------------------------------------- labels
def test_labels_out_of_range_is_an_error_naming_the_images(batch):
    _, labels = batch
    labels = labels.clone()
    labels[1, 0, 0] = 7
    labels[2, 0, 0] = 255  # ignored: fine
    labels[2, 1, 1] = -1
    keys = ['data/a.png', 'data/b.png', 'data/c.png']
    flag = check_labels(labels, K, 255, keys)
    assert flag.code == 'labels_out_of_range' and flag.level == 'error'
    assert 'data/b.png' in flag.message and 'data/c.png' in flag.message
    assert 'data/a.png' not in flag.message
    assert '[-1, 7]' in flag.message and 'reduce_zero_label' in flag.fix
    labels[1, 0, 0] = 0
    labels[2, 1, 1] = 3
    assert check_labels(labels, K, 255, keys) is None


# ------------------------------------------------------------ end checks
def _counts(correct, valid=100):
    return dict(correct=correct, valid=valid)


def _record(key, clean, **attacks):
    return dict(
        key=key,
        num_classes=K,
        clean=_counts(clean),
        attacks={'8': {n: _counts(c) for n, c in attacks.items()}},
    )


def test_robust_above_clean():
    records = [
        _record('a', 80, A=60, B=85),  # B above clean, worst case not
        _record('b', 50, A=55, B=70),  # both above: the worst case too
        _record('c', 90, A=10, B=20),
        _record('d', 90, A=90, B=90),  # equal is fine
    ]
    flag = check_robust_above_clean(records)
    assert flag.code == 'robust_above_clean' and flag.level == 'warning'
    eps = flag.details['eps']['8']
    assert eps['images'] == 4 and eps['worst_case'] == 1
    assert eps['attacks'] == {'A': 1, 'B': 2}
    assert eps['worst_case_images'] == ['b']
    assert 'the worst case on 1/4 images (25.0%' in flag.message
    assert check_robust_above_clean(records[2:]) is None
    # one attack above clean, the worst case not: information, no flag
    assert check_robust_above_clean([records[0]] + records[2:]) is None


def test_clean_near_chance():
    summary = dict(clean=dict(mIoU=20.0, aAcc=60.0))
    assert check_clean_accuracy(summary, K).code == 'clean_near_chance'  # mIoU 25
    summary = dict(clean=dict(mIoU=40.0, aAcc=28.0))
    assert check_clean_accuracy(summary, K).code == 'clean_near_chance'  # aAcc 30
    assert check_clean_accuracy(dict(clean=dict(mIoU=40.0, aAcc=80.0)), K) is None
    # 75% background over 4 classes: background everywhere gives mIoU 18.75
    area = [75, 10, 10, 5]
    summary = dict(clean=dict(mIoU=19.5, aAcc=76.0))
    flag = check_clean_accuracy(summary, K, area)
    assert flag.details['constant_mIoU'] == 18.75
    assert 'predicting class 0 (75.0% of the pixels)' in flag.message
    summary = dict(clean=dict(mIoU=22.0, aAcc=80.0))  # mIoU under 100/K: fine
    assert check_clean_accuracy(summary, K, area) is None


def test_flag_codes_are_documented():
    doc = open(osp.join(REPO, 'docs', 'flags.md')).read()
    for code, level in FLAG_CODES.items():
        assert f'## `{code}`' in doc, code
        section = doc.split(f'## `{code}`')[1].split('\n## ')[0]
        for part in ('Raised if', 'Why it matters', 'Fix'):
            assert part in section, (code, part)
        assert f'({level})' in section.splitlines()[0], code
    with pytest.raises(ValueError):
        Flag('x', 'info', 'm', 'f')


# -------------------------------------------- metric, results file, report
def test_metric_writes_flags_and_report_shows_them(tmp_path):
    from mmseg_robust.evaluation.results import load_results
    from mmseg_robust.reporting import load_result, write_report

    metric = RobustnessMetric(worst_case_modes=['best'])
    metric.set_run_info(work_dir=str(tmp_path), timestamp='t1')
    stochastic = Flag('stochastic_inference', 'warning', 'two passes differ.', 'EOT')

    def counts(correct):
        half = correct // 2
        return dict(
            intersect=[half, correct - half, 0, 0],
            union=[100 - half, 100 - correct + half, 0, 0],
            label_area=[50, 50, 0, 0],
            correct=correct,
            valid=100,
        )

    def full(key, clean, adv):
        return dict(
            key=key,
            num_classes=K,
            clean=counts(clean),
            attacks={'8': {'A': counts(adv)}},
        )

    # the flags travel with the loop's outputs
    metric.process(
        None,
        [
            dict(robustness=full('a', 90, 95), robustness_flags=[stochastic, None]),
            dict(robustness=full('b', 90, 10), robustness_flags=[stochastic]),
        ],
    )
    metric.evaluate(2)
    data = json.load(open(metric.results_path))
    assert data['schema_version'] == 3
    assert [f['code'] for f in data['flags']] == [
        'stochastic_inference',
        'robust_above_clean',
    ]
    assert set(data['flags'][0]) == {'code', 'level', 'message', 'fix', 'details'}
    assert load_results(metric.results_path).flags == data['flags']
    row = load_result(metric.results_path, name='m')
    assert [f['code'] for f in row['flags']] == [
        'stochastic_inference',
        'robust_above_clean',
    ]
    md = open(write_report([row], str(tmp_path / 'r'), print_table=False)['markdown'])
    text = md.read()
    assert '**warning `stochastic_inference`**' in text and 'Fix: EOT' in text
    # schema 2 files were written without self-checks
    old = dict(data, schema_version=2)
    row2 = load_result(old, name='old')
    assert row2['flags'] is None
    md = write_report([row2], str(tmp_path / 'r2'), print_table=False)['markdown']
    assert 'without self-checks' in open(md).read()
    # checks off: no flags, recorded as not checked
    metric.set_run_info(work_dir=str(tmp_path), timestamp='t2')
    metric.process(None, [dict(robustness=full('a', 90, 95), robustness_flags=None)])
    metric.evaluate(1)
    assert json.load(open(metric.results_path))['flags'] is None


def test_final_checks_silent_on_a_normal_evaluation():
    records = [_record('a', 80, A=60), _record('b', 70, A=30)]
    summary = dict(clean=dict(mIoU=50.0, aAcc=75.0))
    assert final_checks(records, summary) == []


def test_attack_warnings_are_recorded_and_raised_again():
    from mmseg_robust.attacks import AttackWarning
    from mmseg_robust.evaluation.evaluator import attack_warnings

    sink = []
    with warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter('always')
        with attack_warnings(sink):
            warnings.warn('eps=0.03 looks like [0, 1] units', AttackWarning)
            # recognised by category, not by the file that raised it
            warnings.warn_explicit(
                'unrelated',
                UserWarning,
                osp.join('x', 'mmseg_robust', 'attacks', 'base.py'),
                1,
            )
    assert sink == ['eps=0.03 looks like [0, 1] units']
    assert len(outer) == 2  # both still reach the user


def test_evaluator_option_turns_checks_off():
    from mmengine.config import Config

    from mmseg_robust.engine.presets import apply_robustness_evaluator

    cfg = Config.fromfile(
        osp.join(REPO, 'configs', 'synthetic', 'upernet_convnext-micro_synthetic.py')
    )
    apply_robustness_evaluator(
        cfg, dict(type='PGD', self_checks='false', class_weights=[1] * 5)
    )
    assert cfg.test_cfg.self_checks is False


PROBE_NAMES = ('large_radius', 'gradient_free')


def test_evaluator_option_probes():
    """`--cfg-options evaluator.probes=...` as tools/test.py parses it reaches
    the loop and its evaluator; unknown probes fail before the Runner."""
    from argparse import ArgumentParser

    from mmengine.config import Config, DictAction

    from mmseg_robust.engine.presets import (
        apply_robustness_evaluator,
        normalize_evaluator_options,
    )
    from mmseg_robust.evaluation.probes import probe_settings

    path = osp.join(REPO, 'configs', 'synthetic', 'upernet_convnext-micro_synthetic.py')
    parser = ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    for given, expected in (
        (['evaluator.probes=large_radius'], {'large_radius'}),
        (['evaluator.probes=large_radius,gradient_free'], set(PROBE_NAMES)),
        (['evaluator.probes=True'], set(PROBE_NAMES)),
    ):
        cfg = Config.fromfile(path)
        options = parser.parse_args(
            ['--cfg-options', 'evaluator=PGD', 'evaluator.class_weights=[1,1,1,1,1]']
            + given
        ).cfg_options
        cfg.merge_from_dict(normalize_evaluator_options(options))
        apply_robustness_evaluator(cfg)
        assert set(probe_settings(cfg.test_cfg.probes)) == expected, given
    cfg = Config.fromfile(path)
    with pytest.raises(ValueError, match='unknown probe'):
        apply_robustness_evaluator(
            cfg, dict(type='PGD', probes='square', class_weights=[1] * 5)
        )


# ----------------------------------------------------- end to end, tools/test.py
def _results(work):
    files = sorted(glob.glob(osp.join(work, 'robustness_*.json')))
    assert files
    with open(files[-1]) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def trained_checkpoint(
    run_tool, small_config, synthetic_root, data_options, tmp_path_factory
):
    """The small model, trained long enough to be accurate on its 48 training
    images (test_robustness_eval.py's 150 iterations predict background
    everywhere: clean_near_chance)."""
    work = str(tmp_path_factory.mktemp('checks_ckpt'))
    run_tool(
        [
            'python',
            'tools/train.py',
            small_config,
            '--work-dir',
            work,
            '--cfg-options',
            f'train_cfg.max_iters={TRAIN_ITERS}',
            f'train_cfg.val_interval={TRAIN_ITERS}',
            f'default_hooks.checkpoint.interval={TRAIN_ITERS}',
        ]
        + data_options(synthetic_root)
    )
    return osp.join(work, f'iter_{TRAIN_ITERS}.pth')


TRAIN_ITERS = 300


@pytest.fixture
def sea_on_training_images(
    run_tool, small_config, trained_checkpoint, synthetic_root, data_options, tmp_path
):
    """``run(steps)``: tools/test.py, SEA at eps 8 with ``steps`` iterations per
    attack, on 2 training images (the model is accurate there); its output and
    its results file."""

    def run(steps):
        work = str(tmp_path / f'work_{steps}')
        out = run_tool(
            ['python', 'tools/test.py', small_config, trained_checkpoint]
            + ['--work-dir', work, '--cfg-options']
            + [
                'evaluator.type=SEA',
                'evaluator.eps=8',
                f'evaluator.steps={steps}',
                'test_dataloader.dataset.indices=2',
                'test_dataloader.batch_size=2',
            ]
            + data_options(synthetic_root)
            + [
                'test_dataloader.dataset.data_prefix.img_path=img_dir/train',
                'test_dataloader.dataset.data_prefix.seg_map_path=ann_dir/train',
            ]
        )
        return out, _results(work)

    return run


def test_normal_evaluation_raises_no_flags(sea_on_training_images, tmp_path):
    """The paper's budget (300 iterations per attack): no flag, the attacks
    converged (with 10, 30 or 100 iterations this model's attacks still gain at
    their end: ``attack_unconverged``, see the next test and docs/flags.md)."""
    from mmseg_robust.reporting import load_result, write_report

    out, result = sea_on_training_images(steps=300)
    assert result['schema_version'] == 3 and result['flags'] == [], result['flags']
    assert 'Self-check' not in out
    md = write_report([load_result(result)], str(tmp_path / 'r'), print_table=False)
    assert 'no flags raised' in open(md['markdown']).read()


def test_short_attack_is_flagged_unconverged(sea_on_training_images):
    """The same evaluation with 10 iterations per attack: the worst-case
    attacks still gain at their end (flag ``attack_unconverged`` only)."""
    out, result = sea_on_training_images(steps=10)
    flags = result['flags']
    assert [f['code'] for f in flags] == ['attack_unconverged'], flags
    assert flags[0]['details']['eps'][0]['images'] == 2
    assert 'Self-check warning [attack_unconverged]' in out


def test_segnext_stochastic_inference_is_flagged(
    run_tool, small_config, synthetic_root, data_options, tmp_path
):
    """mmseg's SegNeXt (LightHamHead, rand_init=True), shrunk, random weights,
    on the synthetic data: the results file carries ``stochastic_inference``."""
    from mmengine.config import ConfigDict
    from mmengine.registry import init_default_scope

    from mmseg_robust.registry import MODELS

    model = segnext_model_cfg(num_classes=5)
    cfg = tmp_path / 'segnext_synthetic.py'
    cfg.write_text(
        f'_base_ = [{small_config!r}]\nmodel = dict(_delete_=True, **{model!r})\n'
    )
    init_default_scope('mmseg')
    torch.manual_seed(0)
    ckpt = str(tmp_path / 'segnext_random.pth')
    built = MODELS.build(ConfigDict(model))
    torch.save(dict(state_dict=built.state_dict(), meta={}), ckpt)
    work = str(tmp_path / 'work')
    out = run_tool(
        ['python', 'tools/test.py', str(cfg), ckpt, '--work-dir', work]
        + ['--cfg-options', 'evaluator.type=SEA', 'evaluator.eps=8']
        + ['evaluator.steps=2', 'test_dataloader.dataset.indices=2']
        + ['test_dataloader.batch_size=2']
        + data_options(synthetic_root)
    )
    result = _results(work)
    flags = {f['code']: f for f in result['flags']}
    assert 'stochastic_inference' in flags, result['flags']
    assert flags['stochastic_inference']['level'] == 'warning'
    assert 'rand_init' in flags['stochastic_inference']['fix']
    assert 'Self-check warning [stochastic_inference]' in out
    assert out.count('[stochastic_inference]') == 1  # logged once


# ------------------------------------------- the attack outcome against eps
def _full_counts(correct):
    """Counts of 100 pixels, 50 of each of two classes (of K), ``correct`` of
    them right."""
    half = correct // 2
    return dict(
        intersect=[half, correct - half] + [0] * (K - 2),
        union=[100 - half, 100 - correct + half] + [0] * (K - 2),
        label_area=[50, 50] + [0] * (K - 2),
        correct=correct,
        valid=100,
    )


def _two_eps(key, clean, at4, at8):
    """A record with one attack per radius: pixel accuracies in percent."""
    return dict(
        key=key,
        num_classes=K,
        clean=_full_counts(clean),
        attacks={'4': {'A': _full_counts(at4)}, '8': {'A': _full_counts(at8)}},
    )


def test_robust_rises_with_eps_triggers_and_stays_silent():
    from mmseg_robust.evaluation.robustness_metric import summarize_records
    from mmseg_robust.evaluation.self_checks import check_robust_rises_with_eps

    falling = [_two_eps('a', 90, 60, 30), _two_eps('b', 80, 50, 20)]
    summary = summarize_records(falling, ['best'])
    assert check_robust_rises_with_eps(summary) is None
    assert final_checks(falling, summary) == []
    # eps 8 weaker than eps 4 on the average: flagged, with both numbers
    rising = [_two_eps('a', 90, 30, 60), _two_eps('b', 80, 20, 50)]
    summary = summarize_records(rising, ['best'])
    flag = check_robust_rises_with_eps(summary)
    assert flag.code == 'robust_rises_with_eps' and flag.level == 'warning'
    rise = next(r for r in flag.details['rises'] if r['metric'] == 'aACC')
    assert (rise['small'], rise['large']) == ('4', '8')
    assert rise['at_small'] == pytest.approx(25.0)
    assert rise['at_large'] == pytest.approx(55.0)
    assert 'aACC 25.00% at eps 4 but 55.00% at eps 8' in flag.message
    # within the tolerance: silent; the order of the radii in the summary
    # does not matter (sorted by value, not as text: '16' after '4')
    flat = dict(
        eps={
            '16': dict(worst_case=dict(mIoU=30.05, aAcc_img=40.0)),
            '4': dict(worst_case=dict(mIoU=30.0, aAcc_img=40.05)),
        }
    )
    assert check_robust_rises_with_eps(flat) is None
    flat['eps']['16']['worst_case']['mIoU'] = 30.2
    assert check_robust_rises_with_eps(flat).details['rises'][0]['large'] == '16'


def test_image_accuracy_rises_with_eps_triggers_and_stays_silent():
    from mmseg_robust.evaluation.self_checks import (
        check_image_accuracy_rises_with_eps,
    )

    # 20 images falling with eps; one rising by 2 points: 5% is not flagged
    records = [_two_eps(f'i{i}', 90, 50, 20) for i in range(19)]
    records.append(_two_eps('up', 90, 50, 52))
    assert check_image_accuracy_rises_with_eps(records) is None
    # two of 20 (10%): flagged, naming the images
    records[0] = _two_eps('up2', 90, 40, 45)
    flag = check_image_accuracy_rises_with_eps(records)
    assert flag.code == 'image_accuracy_rises_with_eps'
    pair = flag.details['pairs'][0]
    assert (pair['small'], pair['large'], pair['rising'], pair['images']) == (
        '4',
        '8',
        2,
        20,
    )
    assert set(pair['examples']) == {'up', 'up2'}
    # a rise within the 1-point tolerance is noise, not counted
    small = [_two_eps(f'i{i}', 90, 50, 51) for i in range(5)]
    assert check_image_accuracy_rises_with_eps(small) is None
    # the worst case over the attacks decides: one attack rising is not enough
    rec = _two_eps('w', 90, 50, 20)
    rec['attacks']['8']['B'] = _full_counts(80)
    assert check_image_accuracy_rises_with_eps([rec]) is None
    # the metric raises it at the end, into the results file's flags
    summary_records = [_two_eps(f'r{i}', 90, 30, 60) for i in range(3)]
    from mmseg_robust.evaluation.robustness_metric import summarize_records

    codes = [
        f.code
        for f in final_checks(
            summary_records, summarize_records(summary_records, ['best'])
        )
    ]
    assert codes == ['robust_rises_with_eps', 'image_accuracy_rises_with_eps']


# ------------------------------------------------------ unconverged attacks
def test_apgd_reports_the_gain_of_its_last_tenth(attack_models):
    """``late_gain``: the correct pixels the returned point lost in the last
    tenth of the iterations, against the iterates the model saw: the lowest
    correct count over x_0..x_9 minus that over x_0..x_10 (10 steps)."""
    from mmseg_robust.attacks import APGD

    net = attack_models.tiny_net(scale=0.8)
    x, y = attack_models.batch(4, 16, 16, net=net)
    rec = attack_models.Recorder(net)
    out = APGD(eps=8, steps=10, eps_units='255').run(rec, x, y, seeds=[0, 1, 2, 3])
    # x_0 .. x_10, then the prediction at the returned point; no image left
    # the batch (none reached accuracy 0)
    assert len(rec.inputs) == 12 and all(i.shape[0] == 4 for i in rec.inputs)
    with torch.no_grad():
        correct = torch.stack(
            [(net(i).argmax(1) == y).flatten(1).sum(1) for i in rec.inputs[:11]]
        )
    expected = correct[:10].min(0).values - correct.min(0).values
    assert out.stats['late_gain'].tolist() == expected.tolist()


def test_attack_unconverged_triggers_and_stays_silent():
    from mmseg_robust.evaluation.self_checks import check_attack_unconverged

    def rec(key, acc, late):
        counts = _full_counts(acc)
        counts['late_gain'] = late
        return dict(
            key=key, num_classes=K, clean=_full_counts(90), attacks={'8': {'A': counts}}
        )

    # 100 valid pixels per image: a gain of 2 pixels is 2 points
    converged = [rec(f'c{i}', 40, 1) for i in range(8)] + [rec('late', 40, 2)]
    assert check_attack_unconverged(converged) is None  # 1 of 9: under 20%
    improving = converged + [rec(f'l{i}', 40, 5) for i in range(2)]
    flag = check_attack_unconverged(improving)
    assert flag.code == 'attack_unconverged' and flag.level == 'warning'
    entry = flag.details['eps'][0]
    assert (entry['images'], entry['unconverged']) == (11, 3)
    # the worst-case attack decides: a weaker attack still improving does not
    weak = _full_counts(60)
    weak['late_gain'] = 10
    for r in converged:
        r['attacks']['8']['B'] = dict(weak)
    assert check_attack_unconverged(converged) is None
    # attacks without the statistic (PGD) are not counted
    plain = [
        dict(
            key='p',
            num_classes=K,
            clean=_full_counts(90),
            attacks={'8': {'A': _full_counts(40)}},
        )
    ]
    assert check_attack_unconverged(plain) is None
