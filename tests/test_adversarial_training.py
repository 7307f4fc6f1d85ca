"""Adversarial training (PIR-AT / SAT / DDC-AT): batch composition, modes, no
gradient leakage, stock optimizer wrappers, scheme loops, resume equals
uninterrupted, two-process gloo training."""

import copy
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from mmseg_robust.engine import AdversarialTrainLoop, attack_context
from mmseg_robust.models import unwrap_model

CONFIGS = {
    'pirat': 'configs/synthetic/upernet_convnext-micro_pirat_synthetic.py',
    'sat': 'configs/synthetic/upernet_convnext-micro_sat_synthetic.py',
    'ddcat': 'configs/synthetic/upernet_convnext-micro_ddcat_synthetic.py',
}


def _runner(
    repo_root, scheme, synthetic_root, work_dir, batch_size=4, options=None, edit=None
):
    cfg = Config.fromfile(osp.join(repo_root, CONFIGS[scheme]))
    cfg.merge_from_dict(options or {})
    if edit is not None:
        edit(cfg)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = synthetic_root
        cfg[loader].dataset.generator_cfg = dict(splits=dict(train=48, val=16))
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False
    cfg.train_dataloader.batch_size = batch_size
    if 'load_from' not in (options or {}):
        cfg.load_from = None
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'{scheme}_{id(cfg)}'
    runner = Runner.from_cfg(cfg)
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    runner.param_schedulers = runner.build_param_scheduler(runner.param_schedulers)
    return runner


@pytest.mark.parametrize('scheme', ['pirat', 'sat'])
def test_batch_composition(scheme, repo_root, synthetic_root, tmp_path, reset_mmengine):
    runner = _runner(repo_root, scheme, synthetic_root, tmp_path)
    loop = runner.train_loop
    assert isinstance(loop, AdversarialTrainLoop) and loop.scheme == scheme
    batch = next(iter(runner.train_dataloader))
    original = copy.deepcopy(batch)
    adv, stats = loop.adversarial_batch(batch)
    # the data loader's batch is untouched (the preprocessor pads a copy)
    for a, b in zip(batch['inputs'], original['inputs']):
        assert torch.equal(a, b)
    changed = [
        not torch.equal(a.float(), b.float())
        for a, b in zip(adv['inputs'], original['inputs'])
    ]
    eps = loop.attack.eps
    expected = [True] * 4 if scheme == 'pirat' else [False, False, True, True]
    assert changed == expected
    for a, b in zip(adv['inputs'], original['inputs']):
        assert a.shape == b.shape
        # L-inf ball in 0..255 units and the pixel range
        assert (a.float() - b.float()).abs().max() <= eps + 1e-3
        assert a.min() >= 0 and a.max() <= 255
    assert set(stats) >= {'clean.loss', 'clean.acc', 'adv.loss', 'adv.acc'}
    assert stats['adv.acc'] <= stats['clean.acc']
    # labels unchanged
    for s, o in zip(adv['data_samples'], original['data_samples']):
        assert torch.equal(s.gt_sem_seg.data, o.gt_sem_seg.data)


def test_eval_mode_for_the_attack_train_mode_for_the_update(
    repo_root, synthetic_root, tmp_path, reset_mmengine
):
    runner = _runner(repo_root, 'pirat', synthetic_root, tmp_path)
    loop = runner.train_loop
    module = unwrap_model(runner.model)
    seen = {}
    attack_run = loop.attack.run

    def spy_attack(*args, **kwargs):
        seen['attack_training'] = module.training
        seen['attack_requires_grad'] = any(p.requires_grad for p in module.parameters())
        seen['attack_bn'] = [
            m.training
            for m in module.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        return attack_run(*args, **kwargs)

    train_step = runner.model.train_step

    def spy_step(*args, **kwargs):
        seen['update_training'] = module.training
        seen['update_bn'] = [
            m.training
            for m in module.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        # no parameter gradient before the update's own backward
        seen['grads_before_update'] = [
            p.grad for p in module.parameters() if p.grad is not None
        ]
        return train_step(*args, **kwargs)

    loop.attack.run = spy_attack
    runner.model.train_step = spy_step
    module.train()
    runner.call_hook('before_train_epoch')
    loop.run_iter(next(iter(runner.train_dataloader)))
    assert seen['attack_training'] is False
    assert not any(seen['attack_bn']) and seen['attack_bn']
    assert seen['attack_requires_grad'] is False
    assert seen['update_training'] is True and all(seen['update_bn'])
    assert seen['grads_before_update'] == []
    assert all(p.requires_grad for p in module.parameters())


def test_attack_context_refuses_parameter_gradients(
    repo_root, synthetic_root, tmp_path, reset_mmengine
):
    runner = _runner(repo_root, 'pirat', synthetic_root, tmp_path)
    p = next(runner.model.parameters())
    with pytest.raises(RuntimeError, match='parameter gradient changed'):
        with attack_context(runner.model):
            p.grad = torch.ones_like(p)


def _small_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1)
    )


def test_attack_context_restores_the_model():
    model = _small_model().train()
    frozen = model[2].bias
    frozen.requires_grad_(False)  # frozen before: stays frozen
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with attack_context(model) as module:
            assert module is model and not model.training
            assert not any(m.training for m in model.modules())
            assert not any(p.requires_grad for p in model.parameters())
            assert not torch.is_autocast_cpu_enabled()
            x = torch.rand(1, 3, 8, 8, requires_grad=True)
            (grad,) = torch.autograd.grad(model(x).sum(), x)
            assert grad.dtype == torch.float32
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [
        True,
        True,
        True,
        True,
        True,
        False,
    ]
    assert all(p.grad is None for p in model.parameters())
    # an eval-mode model stays in eval mode
    model.eval()
    with attack_context(model):
        pass
    assert not model.training


def test_attack_context_raises_if_a_parameter_gradient_changes():
    model = _small_model()
    model(torch.rand(1, 3, 8, 8)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match='parameter gradient changed'):
        with attack_context(model):
            model[0].weight.grad.add_(1)  # in place
    assert all(p.requires_grad for p in model.parameters())
    model[0].weight.grad.copy_(grads[0])
    with pytest.raises(RuntimeError, match='parameter gradient changed'):
        with attack_context(model):
            model[1].bias.grad = None  # replaced
    # param_grads=True (leak_attack_grads): parameters stay trainable and
    # their gradients may change; refused with AMP
    with attack_context(model, param_grads=True):
        assert all(p.requires_grad for p in model.parameters())
        model(torch.rand(1, 3, 8, 8)).sum().backward()
    with pytest.raises(ValueError, match='mixed precision'):
        with attack_context(model, param_grads=True, amp=True):
            pass


def test_loops_keep_mmengines_run():
    """One run_iter override: mmengine's IterBasedTrainLoop.run runs as is."""
    from mmengine.runner import IterBasedTrainLoop

    assert 'run' not in AdversarialTrainLoop.__dict__
    assert 'run_iter' in AdversarialTrainLoop.__dict__
    assert AdversarialTrainLoop.run is IterBasedTrainLoop.run


def _train_one_iteration(repo_root, synthetic_root, tmp_path, scheme, options=None):
    """runner.train() for one iteration; returns the runner and the batch the
    update got."""
    runner = _runner(
        repo_root,
        scheme,
        synthetic_root,
        tmp_path,
        options=dict(
            {
                'train_cfg.max_iters': 1,
                'train_cfg.val_interval': 100,
                'default_hooks.logger.interval': 1,
            },
            **(options or {}),
        ),
    )
    module = unwrap_model(runner.model)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    seen = {}
    train_step = runner.model.train_step

    def spy_step(data, optim_wrapper):
        seen['batch'] = copy.deepcopy(data)
        seen['optim_wrapper'] = optim_wrapper
        return train_step(data, optim_wrapper=optim_wrapper)

    runner.model.train_step = spy_step
    runner.train()
    after = module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    return runner, seen


@pytest.mark.parametrize('scheme', ['pirat', 'sat', 'ddcat'])
def test_stock_optim_wrapper_trains_adversarially(
    scheme, repo_root, synthetic_root, tmp_path, reset_mmengine
):
    from mmengine.optim import OptimWrapper

    assert (
        Config.fromfile(osp.join(repo_root, CONFIGS[scheme])).optim_wrapper.type
        == 'OptimWrapper'
    )
    runner, seen = _train_one_iteration(repo_root, synthetic_root, tmp_path, scheme)
    assert type(runner.optim_wrapper) is OptimWrapper
    assert seen['optim_wrapper'] is runner.optim_wrapper
    # the update got the scheme's adversarial batch
    loop = runner.train_loop
    attacked = loop.train_scheme.attacked_indices(4)
    assert attacked == ([0, 1, 2, 3] if scheme == 'pirat' else [2, 3])
    assert len(seen['batch']['inputs']) == 4
    assert ('gt_division' in seen['batch']['data_samples'][0]) == (scheme == 'ddcat')
    scalars = runner.message_hub.log_scalars
    assert {'train/adv.acc', 'train/clean.acc', 'train/attack_time_share'} <= set(
        scalars
    )


def test_schemes_are_registered_classes(
    repo_root, synthetic_root, tmp_path, reset_mmengine
):
    from mmseg_robust.engine import DDCATScheme, PIRATScheme, SATScheme, TrainScheme
    from mmseg_robust.registry import TRAIN_SCHEMES

    for name, cls in (
        ('pirat', PIRATScheme),
        ('sat', SATScheme),
        ('ddcat', DDCATScheme),
    ):
        scheme = TRAIN_SCHEMES.build(dict(type=name))
        assert type(scheme) is cls and scheme.name == name
    assert PIRATScheme().attacked_indices(3) == [0, 1, 2]
    assert SATScheme().attacked_indices(5) == [2, 3, 4]
    assert SATScheme().images_to_attack(5) == [2, 3, 4]
    assert DDCATScheme().attacked_indices(4) == [2, 3]
    assert DDCATScheme().images_to_attack(4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match='at least 2'):
        SATScheme().attacked_indices(1)
    with pytest.raises(ValueError, match='unknown adversarial training'):
        _runner(
            repo_root,
            'pirat',
            synthetic_root,
            tmp_path / 'u',
            options={'train_cfg.scheme': 'nope'},
        ).train_loop

    # a scheme of one's own, by registered name
    @TRAIN_SCHEMES.register_module(name='_test_last_only')
    class LastOnly(TrainScheme):
        def attacked_indices(self, batch_size):
            return [batch_size - 1]

    try:
        runner = _runner(
            repo_root,
            'pirat',
            synthetic_root,
            tmp_path / 'o',
            options={'train_cfg.scheme': '_test_last_only'},
        )
        loop = runner.train_loop
        assert loop.scheme == '_test_last_only'
        batch = next(iter(runner.train_dataloader))
        adv, _ = loop.adversarial_batch(copy.deepcopy(batch))
        assert [
            not torch.equal(a, b) for a, b in zip(adv['inputs'], batch['inputs'])
        ] == [False, False, False, True]
    finally:
        TRAIN_SCHEMES.module_dict.pop('_test_last_only')


ITERS = [
    'load_from=None',
    'train_cfg.val_interval=100',
    'default_hooks.checkpoint.interval=3',
    'default_hooks.logger.interval=1',
    'param_scheduler.0.end=2',
    'param_scheduler.1.begin=2',
    'param_scheduler.1.end=6',
    'train_dataloader.batch_size=4',
]


def test_resumed_equals_uninterrupted(
    run_tool, repo_root, synthetic_root, data_options, tmp_path
):
    cfg = CONFIGS['sat']
    opts = ITERS + data_options(synthetic_root)
    full = str(tmp_path / 'full')
    run_tool(
        [
            'python',
            'tools/train.py',
            cfg,
            '--work-dir',
            full,
            '--cfg-options',
            'train_cfg.max_iters=6',
        ]
        + opts
    )
    part = str(tmp_path / 'part')
    run_tool(
        [
            'python',
            'tools/train.py',
            cfg,
            '--work-dir',
            part,
            '--cfg-options',
            'train_cfg.max_iters=3',
        ]
        + opts
    )
    out = run_tool(
        [
            'python',
            'tools/train.py',
            cfg,
            '--work-dir',
            part,
            '--resume',
            '--cfg-options',
            'train_cfg.max_iters=6',
        ]
        + opts
    )
    assert 'Restored the random state saved at iteration 3' in out
    a = torch.load(osp.join(full, 'iter_6.pth'), weights_only=True)
    b = torch.load(osp.join(part, 'iter_6.pth'), weights_only=True)
    for key, value in a['state_dict'].items():
        assert torch.equal(value, b['state_dict'][key]), key


def test_two_process_gloo_training(run_tool, synthetic_root, data_options, tmp_path):
    work = str(tmp_path / 'dist')
    out = run_tool(
        [
            'bash',
            'tools/dist_train.sh',
            CONFIGS['pirat'],
            '2',
            '--work-dir',
            work,
            '--cfg-options',
            'train_cfg.max_iters=4',
        ]
        + ITERS
        + data_options(synthetic_root),
        env=dict(PORT='29671', CUDA_VISIBLE_DEVICES=''),
    )
    assert 'Distributed training: True' in out and 'GPU number: 2' in out
    assert 'adv.acc' in out and 'attack_time_share' in out
    assert osp.exists(osp.join(work, 'iter_4.pth'))


def test_adversarial_val_loop_monitors_robustness(
    run_tool, repo_root, synthetic_root, data_options, tmp_path
):
    cfg = tmp_path / 'pirat_advval.py'
    cfg.write_text(
        f"_base_ = '{osp.join(repo_root, CONFIGS['pirat'])}'\n"
        "val_cfg = dict(_delete_=True, type='AdversarialValLoop', eps=4,\n"
        "               attacks=[dict(type='PGD', steps=2)])\n"
        "val_evaluator = dict(_delete_=True, type='RobustnessMetric',\n"
        "                     name='PGD', worst_case_modes=['best'])\n"
    )
    out = run_tool(
        [
            'python',
            'tools/train.py',
            str(cfg),
            '--work-dir',
            str(tmp_path / 'work'),
            '--cfg-options',
            'train_cfg.max_iters=2',
            'train_cfg.val_interval=2',
        ]
        + [o for o in ITERS if not o.startswith('train_cfg.val_interval')]
        + data_options(synthetic_root)
    )
    assert 'eps4/PGD/mIoU' in out and 'Iter(val)' in out


def test_ddcat_from_a_plain_checkpoint_validates_adversarially(
    repo_root, synthetic_root, tmp_path, reset_mmengine
):
    """The synthetic DDC-AT config starts from the plain model's checkpoint
    (its cls2 and mask1 start fresh): an AdversarialValLoop validates the
    model being trained and never re-checks ``load_from`` against it."""
    from mmengine.config import ConfigDict
    from mmengine.registry import init_default_scope

    from mmseg_robust.registry import MODELS

    init_default_scope('mmseg')
    plain = Config.fromfile(
        osp.join(repo_root, 'configs/synthetic/upernet_convnext-micro_synthetic.py')
    )
    torch.manual_seed(0)
    model = MODELS.build(ConfigDict(plain.model))
    ckpt = str(tmp_path / 'plain.pth')
    torch.save(dict(state_dict=model.state_dict(), meta={}), ckpt)

    def edit(cfg):
        cfg.train_cfg.max_iters = 1
        cfg.train_cfg.val_interval = 1
        cfg.val_cfg = dict(
            type='AdversarialValLoop', eps=4, attacks=[dict(type='PGD', steps=1)]
        )
        cfg.val_evaluator = dict(
            type='RobustnessMetric', name='PGD', worst_case_modes=['best']
        )
        cfg.val_dataloader.dataset.indices = 2
        cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=-1)

    runner = _runner(
        repo_root,
        'ddcat',
        synthetic_root,
        tmp_path / 'work',
        batch_size=2,
        options={'load_from': ckpt},
        edit=edit,
    )
    runner.train()
    assert 'val/eps4/PGD/mIoU' in runner.message_hub.log_scalars


def _variable_size_batch(sizes, num_classes=5, seed=0):
    """A training batch as the loader gives it after RandomResize + RandomCrop
    without Pad: uint8 images of different sizes, labels with void pixels."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i, (h, w) in enumerate(sizes):
        inputs.append(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
        label = torch.randint(0, num_classes, (1, h, w), generator=g)
        label[:, :2] = 255
        sample = SegDataSample(gt_sem_seg=PixelData(data=label))
        sample.set_metainfo(
            dict(img_shape=(h, w), ori_shape=(h, w), img_path=f'img{i}.png')
        )
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _accuracy_on(loop, batch, indices):
    """Pixel accuracy (%) of the eval-mode model on ``batch``'s images
    ``indices`` (valid pixels, void excluded), recomputed from the raw inputs."""
    from mmseg_robust.models import TrainingBatchPixelView

    module = unwrap_model(loop.runner.model).eval()
    processed = module.data_preprocessor(
        dict(inputs=batch['inputs'], data_samples=copy.deepcopy(batch['data_samples'])),
        True,
    )
    view = TrainingBatchPixelView(
        module, processed['inputs'], processed['data_samples']
    ).subset(indices)
    with torch.no_grad():
        pred = view(view.images).argmax(1)
    valid = view.labels != loop.ignore_index
    if view.valid is not None:
        valid &= view.valid
    return 100 * float(((pred == view.labels) & valid).sum() / valid.sum())


@pytest.mark.parametrize('scheme', ['pirat', 'sat', 'ddcat'])
def test_padded_variable_size_batch(
    scheme, repo_root, synthetic_root, tmp_path, reset_mmengine
):
    """Crops smaller than the preprocessor's size are padded by it; the decode
    head would resize the whole batch to image 0's unpadded size (the crash of
    mmseg's standard pipelines). The view works at the padded size, keeps the
    padding fixed and out of the losses, and returns unpadded raw inputs."""
    runner = _runner(repo_root, scheme, synthetic_root, tmp_path)
    loop = runner.train_loop
    # adv.acc at the returned images (the training default logs the last
    # evaluated iterate: test_training_attack_skips_the_forward_at_its_output)
    loop.attack.predict_output = True
    sizes = [(46, 46), (64, 50), (30, 64), (64, 64)]
    batch = _variable_size_batch(sizes)
    original = copy.deepcopy(batch)
    adv, stats = loop.adversarial_batch(batch)
    attacked = loop.train_scheme.attacked_indices(len(sizes))
    for i, (a, o) in enumerate(zip(adv['inputs'], original['inputs'])):
        assert a.shape == o.shape
        delta = (a.float() - o.float()).abs().max()
        assert delta <= loop.attack.eps + 1e-3
        assert (delta > 0) == (i in attacked)
        assert a.min() >= 0 and a.max() <= 255
    # the logged accuracies (%) are the eval-mode model's on the attacked images
    # (DDC-AT: all, the clean half for its division labels), before and after the
    # attack (random labels: PGD's final iterate need not lower the accuracy)
    seen = list(range(len(sizes))) if scheme == 'ddcat' else attacked
    assert stats['clean.acc'] == pytest.approx(
        _accuracy_on(loop, original, seen), abs=1e-4
    )
    if scheme != 'ddcat':  # (DDC-AT's batch keeps its clean half clean)
        assert stats['adv.acc'] == pytest.approx(
            _accuracy_on(loop, adv, attacked), abs=1e-4
        )
    # the update sees the composed batch without a shape error
    runner.model.train()
    runner.call_hook('before_train_epoch')
    runner.model.train_step(adv, optim_wrapper=runner.optim_wrapper)


def test_training_view_holds_the_padding(
    repo_root, synthetic_root, tmp_path, reset_mmengine
):
    from mmseg_robust.models import TrainingBatchPixelView

    runner = _runner(repo_root, 'pirat', synthetic_root, tmp_path)
    module = unwrap_model(runner.model).eval()
    batch = _variable_size_batch([(46, 40), (64, 64)])
    processed = module.data_preprocessor(batch, True)
    view = TrainingBatchPixelView(
        module, processed['inputs'], processed['data_samples']
    )
    assert view.images.shape == (2, 3, 64, 64)
    assert view.labels.shape == (2, 64, 64)
    # valid: exactly the unpadded content
    assert view.valid[0, :46, :40].all() and not view.valid[0, 46:].any()
    assert not view.valid[0, :, 40:].any() and view.valid[1].all()
    with torch.no_grad():
        logits = view(view.images)
        assert logits.shape[2:] == (64, 64)
        garbage = view.images.clone()
        garbage[0, :, 46:] = 1.0
        garbage[0, :, :, 40:] = 0.0
        assert torch.equal(view(garbage), logits)
    x = view.images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(view(x).sum(), x)
    assert (grad[0, :, 46:] == 0).all() and (grad[0, :, :, 40:] == 0).all()
    assert grad[0, :, :46, :40].abs().sum() > 0
    # round trip to the loader's raw inputs (BGR, unpadded, 0..255)
    raw = view.raw_inputs(view.images, batch['inputs'])
    for r, b in zip(raw, batch['inputs']):
        assert r.shape == b.shape
        assert (r - b.float()).abs().max() < 1e-3


def test_ignore_index_comes_from_the_model(
    repo_root, synthetic_root, tmp_path, reset_mmengine
):
    runner = _runner(
        repo_root,
        'pirat',
        synthetic_root,
        tmp_path,
        options={'model.decode_head.ignore_index': 4},
    )
    loop = runner.train_loop
    assert loop.ignore_index == 4 and loop.attack.ignore_index == 4
    # pixels labelled 4 are ignored by the attack and the logged accuracy
    batch = _variable_size_batch([(64, 64)] * 2)
    for s in batch['data_samples']:
        s.gt_sem_seg.data[:] = 4
    _, stats = loop.adversarial_batch(batch)
    assert stats['clean.acc'] == 0 and stats['adv.acc'] == 0


def test_ddcat_leaves_the_loader_samples_alone(
    repo_root, synthetic_root, tmp_path, reset_mmengine
):
    runner = _runner(repo_root, 'ddcat', synthetic_root, tmp_path)
    batch = next(iter(runner.train_dataloader))
    adv, _ = runner.train_loop.adversarial_batch(batch)
    for original, new in zip(batch['data_samples'], adv['data_samples']):
        assert 'gt_division' not in original
        assert 'gt_division' not in original.keys()
        # every listed field exists: items() and to() work
        dict(original.items())
        original.to('cpu')
        assert 'gt_division' in new
        assert torch.equal(new.gt_sem_seg.data, original.gt_sem_seg.data)
        assert new.metainfo == original.metainfo


def test_leak_attack_grads_adds_the_attack_gradients(
    repo_root, synthetic_root, tmp_path, reset_mmengine
):
    """Opt-in reproduction of the PIR-AT reference's quirk: each attack step
    adds d(batch-mean objective)/d(theta), in eval mode, to the parameters'
    gradients. Oracle: the same sum recomputed from the attack's iterates."""
    import torch.nn.functional as F

    options = {
        'train_cfg.attack': dict(
            type='PGD', eps=4, steps=3, step_size=2.55, random_start=False
        )
    }
    runner = _runner(repo_root, 'pirat', synthetic_root, tmp_path, options=options)
    loop = runner.train_loop
    module = unwrap_model(runner.model)
    batch = next(iter(runner.train_dataloader))
    # off (default): no parameter gradient appears
    loop.adversarial_batch(copy.deepcopy(batch))
    assert all(p.grad is None for p in module.parameters())
    # on: record the iterates the attack differentiates
    loop.leak_attack_grads = True
    iterates = []
    run = loop.attack.run

    def spy(model, images, labels, valid=None, seeds=None):

        def recording(x):
            if x.requires_grad:
                iterates.append(x.detach().clone())
            return model(x)

        return run(recording, images, labels, valid, seeds)

    loop.attack.run = spy
    module.train()
    adv, _ = loop.adversarial_batch(copy.deepcopy(batch))
    assert module.training  # back in train mode
    leaked = {
        n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None
    }
    assert len(iterates) == 3 and leaked
    # oracle: sum over the iterates of the gradient of the mean per-image
    # objective (CE summed over valid pixels / H*W), eval mode
    for p in module.parameters():
        p.grad = None
    processed = module.data_preprocessor(
        dict(inputs=batch['inputs'], data_samples=copy.deepcopy(batch['data_samples'])),
        True,
    )
    from mmseg_robust.models import TrainingBatchPixelView

    view = TrainingBatchPixelView(
        module, processed['inputs'], processed['data_samples']
    )
    module.eval()
    b, h, w = view.labels.shape
    for x in iterates:
        logits = view(x)
        ce = F.cross_entropy(logits, view.labels, ignore_index=255, reduction='none')
        (ce.sum() / (h * w) / b).backward()
    module.train()
    for n, p in module.named_parameters():
        if n in leaked:
            torch.testing.assert_close(leaked[n], p.grad, rtol=1e-4, atol=1e-6)


def test_missing_load_from_names_the_command_that_writes_it(
    repo_root, synthetic_root, tmp_path, reset_mmengine, monkeypatch
):
    monkeypatch.chdir(repo_root)
    # the synthetic PIR-AT config starts from the clean model's checkpoint
    missing = 'work_dirs/upernet_convnext-micro_synthetic/iter_1000.pth'
    assert Config.fromfile(osp.join(repo_root, CONFIGS['pirat'])).load_from == missing
    # raised when the loop is built, before its data loader (which would
    # generate the dataset) and before any weight is initialised
    no_data = tmp_path / 'not_generated'
    with pytest.raises(FileNotFoundError) as info:
        _runner(
            repo_root,
            'pirat',
            str(no_data),
            tmp_path,
            options={'load_from': str(tmp_path / missing)},
        ).train()
    assert not no_data.exists()
    msg = str(info.value)
    assert (
        'python tools/train.py configs/synthetic/'
        'upernet_convnext-micro_synthetic.py' in msg
    )
    assert '--cfg-options load_from=PATH' in msg


def _split(batch, parts):
    """``batch`` cut into ``parts`` micro-batches of consecutive images."""
    n = len(batch['inputs']) // parts
    return [
        dict(
            inputs=batch['inputs'][i * n : (i + 1) * n],
            data_samples=batch['data_samples'][i * n : (i + 1) * n],
        )
        for i in range(parts)
    ]


def _leaked(loop, batch):
    """The parameter gradients ``leak_attack_grads`` adds for ``batch`` (on top of
    the gradients already there), by name."""
    module = unwrap_model(loop.runner.model)
    before = {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in module.named_parameters()
    }
    loop.adversarial_batch(copy.deepcopy(batch))
    return {
        n: p.grad - before[n]
        for n, p in module.named_parameters()
        if p.grad is not None
    }


def _count_backward(optim_wrapper, module):
    """Advance the wrapper's accumulation count as a micro-batch's update does
    (``OptimWrapper.backward`` counts), adding exact zeros to the gradients."""
    optim_wrapper.backward(sum((p * 0).sum() for p in module.parameters()))


def test_leak_with_accumulation_equals_a_larger_batch(
    repo_root, synthetic_root, tmp_path, reset_mmengine
):
    """Oracle: with ``accumulative_counts=k`` the k micro-batches of a batch leak
    what the batch does in one iteration without accumulation (the attack runs
    in eval mode, so every image is attacked independently)."""
    k = 2
    options = {
        'train_cfg.attack': dict(
            type='PGD', eps=4, steps=2, step_size=2.55, random_start=False
        ),
        'train_cfg.leak_attack_grads': True,
    }
    runner = _runner(repo_root, 'pirat', synthetic_root, tmp_path, options=options)
    loop, module = runner.train_loop, unwrap_model(runner.model)
    batch = next(iter(runner.train_dataloader))
    assert len(batch['inputs']) == 4
    whole = _leaked(loop, batch)
    assert whole and all(g.abs().sum() > 0 for g in whole.values())
    module.zero_grad(set_to_none=True)

    from mmengine.optim import OptimWrapper

    wrapper = OptimWrapper(
        torch.optim.SGD(module.parameters(), lr=0.1), accumulative_counts=k
    )
    runner.optim_wrapper = wrapper
    wrapper.initialize_count_status(module, 0, 4)
    for micro in _split(batch, k):
        _leaked(loop, micro)
        _count_backward(wrapper, module)
    for n, p in module.named_parameters():
        if n in whole:
            torch.testing.assert_close(p.grad, whole[n], rtol=1e-4, atol=1e-7)
    # without the 1/k the micro-batches would leak k times as much
    some = next(iter(whole))
    assert not torch.allclose(
        dict(module.named_parameters())[some].grad, k * whole[some], rtol=1e-2
    )


def test_leak_scale_follows_mmengines_loss_factor(
    repo_root, synthetic_root, tmp_path, reset_mmengine
):
    """The leak is divided by the factor ``OptimWrapper.scale_loss`` applies:
    ``accumulative_counts``, and in the last iterations, when ``max_iters`` is
    not a multiple of it, the number of remaining ones."""
    from mmengine.optim import OptimWrapper

    runner = _runner(
        repo_root,
        'pirat',
        synthetic_root,
        tmp_path,
        options={'train_cfg.leak_attack_grads': True},
    )
    loop, module = runner.train_loop, unwrap_model(runner.model)
    wrapper = OptimWrapper(
        torch.optim.SGD(module.parameters(), lr=0.1), accumulative_counts=3
    )
    runner.optim_wrapper = wrapper
    wrapper.initialize_count_status(module, 0, 4)  # 3 + a remainder of 1
    scales = []
    for _ in range(4):
        scales.append(loop._leak_scale(4))
        loss_factor = 1 / float(wrapper.scale_loss(torch.ones(())))
        assert scales[-1] == pytest.approx(1 / (4 * loss_factor))
        _count_backward(wrapper, module)
    assert scales == pytest.approx([1 / 12, 1 / 12, 1 / 12, 1 / 4])


def test_amp_with_leak_is_refused_when_the_loop_is_built(
    repo_root, synthetic_root, tmp_path, reset_mmengine
):
    """``leak_attack_grads`` with mixed precision fails when the loop is built
    (``runner.optim_wrapper`` is then still the config ``tools/train.py --amp``
    edits), not at the first iteration."""
    cfg = Config.fromfile(osp.join(repo_root, CONFIGS['pirat']))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = synthetic_root
        cfg[loader].dataset.generator_cfg = dict(splits=dict(train=48, val=16))
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False
    cfg.load_from = None
    cfg.work_dir = str(tmp_path)
    cfg.train_cfg.leak_attack_grads = True
    cfg.optim_wrapper.type = 'AmpOptimWrapper'  # what --amp sets
    cfg.optim_wrapper.loss_scale = 'dynamic'
    runner = Runner.from_cfg(cfg)
    assert isinstance(runner.optim_wrapper, dict)
    with pytest.raises(ValueError, match='leak_attack_grads .*mixed precision'):
        runner.build_train_loop(runner._train_loop)
    # without the leak the same config builds its loop
    runner._train_loop['leak_attack_grads'] = False
    assert isinstance(runner.build_train_loop(runner._train_loop), AdversarialTrainLoop)


def test_uses_amp_reads_configs_and_built_wrappers():
    from mmengine.optim import AmpOptimWrapper, OptimWrapper, OptimWrapperDict

    from mmseg_robust.engine.adversarial_training import uses_amp

    opt = dict(type='SGD', lr=0.1)
    assert uses_amp(dict(type='AmpOptimWrapper', optimizer=opt))
    assert uses_amp(dict(type='mmengine.AmpOptimWrapper', optimizer=opt))
    assert uses_amp(dict(type=AmpOptimWrapper, optimizer=opt))
    # a registered subclass (a user's)
    from mmseg_robust.registry import OPTIM_WRAPPERS

    class UserAmpWrapper(AmpOptimWrapper):
        pass

    OPTIM_WRAPPERS.register_module(name='_UserAmpWrapper_test', module=UserAmpWrapper)
    try:
        assert uses_amp(dict(type='_UserAmpWrapper_test', optimizer=opt))
    finally:
        OPTIM_WRAPPERS.module_dict.pop('_UserAmpWrapper_test')
    assert not uses_amp(dict(type='OptimWrapper', optimizer=opt))
    assert not uses_amp(dict(optimizer=opt))  # type defaults to OptimWrapper
    # several wrappers by name (a multi-optimizer constructor's config)
    several = dict(
        constructor='MultiOptimWrapperConstructor',
        backbone=dict(type='OptimWrapper', optimizer=opt),
        head=dict(type='AmpOptimWrapper', optimizer=opt),
    )
    assert uses_amp(several)
    several['head']['type'] = 'OptimWrapper'
    assert not uses_amp(several)
    assert not uses_amp(None)
    # built wrappers (an AmpOptimWrapper cannot be built on CPU: an instance
    # without __init__ stands for one)
    plain = OptimWrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1))
    amp = AmpOptimWrapper.__new__(AmpOptimWrapper)
    assert uses_amp(amp) and not uses_amp(plain)
    assert uses_amp(OptimWrapperDict(a=plain, b=amp))
    assert not uses_amp(OptimWrapperDict(a=plain))
    assert uses_amp(dict(a=plain, b=amp))


@pytest.mark.parametrize('scheme', ['pirat', 'sat'])
def test_training_attack_skips_the_forward_at_its_output(
    scheme, repo_root, synthetic_root, tmp_path, reset_mmengine
):
    """The training attack runs no forward at its returned images; the log's
    adv.loss/adv.acc are those of the last iterate it evaluated (the input of
    its last step). The adversarial images are the same as with that forward."""
    import torch.nn.functional as F

    runner = _runner(repo_root, scheme, synthetic_root, tmp_path)
    loop = runner.train_loop
    steps = loop.attack.steps
    assert loop.attack.predict_output is False
    batch = _variable_size_batch([(46, 46), (64, 50), (30, 64), (64, 64)])
    calls = []
    run = loop.attack.run

    def spy(model, images, labels, valid=None, seeds=None):
        def recording(x):
            logits = model(x)
            calls.append((x.requires_grad, logits.detach(), labels, valid))
            return logits

        return run(recording, images, labels, valid, seeds)

    loop.attack.run = spy
    adv, stats = loop.adversarial_batch(copy.deepcopy(batch))
    assert [c[0] for c in calls] == [True] * steps  # no forward without backward
    _, logits, labels, valid = calls[-1]
    valid = (labels != loop.ignore_index) & valid
    n = valid.sum()
    ce = F.cross_entropy(logits, torch.where(valid, labels, 0), reduction='none')
    assert stats['adv.loss'] == pytest.approx(float((ce * valid).sum() / n), rel=1e-5)
    acc = ((logits.argmax(1) == labels) & valid).sum() / n
    assert stats['adv.acc'] == pytest.approx(100 * float(acc), abs=1e-4)
    # with the forward (an attack config may ask for it): same images
    calls.clear()
    loop.attack.predict_output = True
    adv_full, stats_full = loop.adversarial_batch(copy.deepcopy(batch))
    assert [c[0] for c in calls] == [True] * steps + [False]
    for a, b in zip(adv['inputs'], adv_full['inputs']):
        assert torch.equal(a, b)
    assert stats['clean.acc'] == stats_full['clean.acc']
    # an explicit predict_output in the attack config is kept
    runner = _runner(
        repo_root,
        scheme,
        synthetic_root,
        tmp_path / 'explicit',
        options={
            'train_cfg.attack': dict(
                type='PGD',
                eps=4,
                steps=2,
                step_size=2.55,
                random_start=False,
                predict_output=True,
            )
        },
    )
    assert runner.train_loop.attack.predict_output is True


def test_attack_time_share_waits_for_the_device(
    repo_root, synthetic_root, tmp_path, reset_mmengine, monkeypatch
):
    """run_iter synchronises the model's device before the attack, after it and
    after the update, so queued GPU work is billed where it belongs."""
    import mmseg_robust.engine.adversarial_training as at

    events = []
    monkeypatch.setattr(at, '_synchronize', lambda device: events.append(device))
    runner = _runner(repo_root, 'pirat', synthetic_root, tmp_path)
    loop = runner.train_loop
    attack_batch = loop.adversarial_batch

    def spy_attack(data_batch):
        events.append('attack')
        return attack_batch(data_batch)

    train_step = runner.model.train_step

    def spy_step(*args, **kwargs):
        events.append('update')
        return train_step(*args, **kwargs)

    loop.adversarial_batch = spy_attack
    runner.model.train_step = spy_step
    runner.model.train()
    runner.call_hook('before_train_epoch')
    loop.run_iter(next(iter(runner.train_dataloader)))
    cpu = torch.device('cpu')
    assert events == [cpu, 'attack', cpu, 'update', cpu]


def test_synchronize_waits_on_cuda_only(monkeypatch):
    from mmseg_robust.engine.adversarial_training import _device_of, _synchronize

    waited = []
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda d=None: waited.append(d))
    _synchronize(torch.device('cpu'))
    assert waited == []
    _synchronize(torch.device('cuda', 1))
    assert waited == [torch.device('cuda', 1)]
    assert _device_of(_small_model()) == torch.device('cpu')
    assert _device_of(torch.nn.ReLU()) == torch.device('cpu')


def test_adversarial_inputs_stay_on_the_attacks_device(
    repo_root, synthetic_root, tmp_path, reset_mmengine
):
    """raw_inputs returns the adversarial images on their own device (the
    model's), not on the loader's: no round trip through host memory. ('meta'
    stands for an accelerator on a CPU-only machine.)"""
    from mmseg_robust.models import TrainingBatchPixelView

    runner = _runner(repo_root, 'pirat', synthetic_root, tmp_path)
    module = unwrap_model(runner.model).eval()
    batch = _variable_size_batch([(46, 40), (64, 64)])
    processed = module.data_preprocessor(batch, True)
    view = TrainingBatchPixelView(
        module, processed['inputs'], processed['data_samples']
    )
    raw = view.raw_inputs(view.images.to('meta'), batch['inputs'])
    assert [r.device.type for r in raw] == ['meta', 'meta']
    assert [r.shape for r in raw] == [b.shape for b in batch['inputs']]
    # the data preprocessor takes them as they come (mixed with loader inputs)
    raw = view.raw_inputs(view.images, batch['inputs'])
    mixed = module.data_preprocessor(
        dict(inputs=[raw[0], batch['inputs'][1]], data_samples=batch['data_samples']),
        True,
    )
    again = module.data_preprocessor(
        dict(
            inputs=[raw[0].cpu(), batch['inputs'][1]],
            data_samples=batch['data_samples'],
        ),
        True,
    )
    assert torch.equal(mixed['inputs'], again['inputs'])


def test_leak_scale_in_a_training_run_with_accumulation(
    repo_root, synthetic_root, tmp_path, reset_mmengine
):
    """runner.train() with ``accumulative_counts=2`` over 3 iterations: the leak
    is divided by 2, 2, then 1 (the remainder), as mmengine divides the loss."""
    runner = _runner(
        repo_root,
        'pirat',
        synthetic_root,
        tmp_path,
        options={
            'train_cfg.max_iters': 3,
            'train_cfg.val_interval': 100,
            'train_cfg.leak_attack_grads': True,
            'optim_wrapper.accumulative_counts': 2,
        },
    )
    loop = runner.train_loop
    scales, scale = [], loop._leak_scale

    def recording(batch_size):
        scales.append(scale(batch_size))
        return scales[-1]

    loop._leak_scale = recording
    runner.train()
    assert scales == pytest.approx([1 / 8, 1 / 8, 1 / 4])
