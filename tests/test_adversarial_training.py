"""Adversarial training (PIR-AT / SAT): batch composition, modes, no gradient
leakage, resume equals uninterrupted, two-process gloo training."""
import copy
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from mmseg_robust.engine import AdversarialTrainLoop
from mmseg_robust.models import unwrap_model

CONFIGS = {
    'pirat': 'configs/synthetic/upernet_convnext-micro_pirat_synthetic.py',
    'sat': 'configs/synthetic/upernet_convnext-micro_sat_synthetic.py',
    'ddcat': 'configs/synthetic/upernet_convnext-micro_ddcat_synthetic.py',
}


def _runner(repo_root, scheme, synthetic_root, work_dir, batch_size=4,
            options=None):
    cfg = Config.fromfile(osp.join(repo_root, CONFIGS[scheme]))
    cfg.merge_from_dict(options or {})
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = synthetic_root
        cfg[loader].dataset.generator_cfg = dict(
            splits=dict(train=48, val=16))
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False
    cfg.train_dataloader.batch_size = batch_size
    if 'load_from' not in (options or {}):
        cfg.load_from = None
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'{scheme}_{id(cfg)}'
    runner = Runner.from_cfg(cfg)
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    runner.param_schedulers = runner.build_param_scheduler(
        runner.param_schedulers)
    return runner


@pytest.mark.parametrize('scheme', ['pirat', 'sat'])
def test_batch_composition(scheme, repo_root, synthetic_root, tmp_path,
                           reset_mmengine):
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
    assert set(stats) >= {
        'clean.loss', 'clean.acc', 'adv.loss', 'adv.acc'
    }
    assert stats['adv.acc'] <= stats['clean.acc']
    # labels unchanged
    for s, o in zip(adv['data_samples'], original['data_samples']):
        assert torch.equal(s.gt_sem_seg.data, o.gt_sem_seg.data)


def test_eval_mode_for_the_attack_train_mode_for_the_update(
        repo_root, synthetic_root, tmp_path, reset_mmengine):
    runner = _runner(repo_root, 'pirat', synthetic_root, tmp_path)
    loop = runner.train_loop
    module = unwrap_model(runner.model)
    seen = {}
    attack_run = loop.attack.run

    def spy_attack(*args, **kwargs):
        seen['attack_training'] = module.training
        seen['attack_requires_grad'] = any(
            p.requires_grad for p in module.parameters())
        seen['attack_bn'] = [
            m.training for m in module.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        return attack_run(*args, **kwargs)

    train_step = runner.model.train_step

    def spy_step(*args, **kwargs):
        seen['update_training'] = module.training
        seen['update_bn'] = [
            m.training for m in module.modules()
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


def test_attack_context_refuses_parameter_gradients(repo_root, synthetic_root,
                                                    tmp_path,
                                                    reset_mmengine):
    runner = _runner(repo_root, 'pirat', synthetic_root, tmp_path)
    p = next(runner.model.parameters())
    with pytest.raises(RuntimeError, match='parameter gradient changed'):
        with runner.optim_wrapper.attack_context(runner.model):
            p.grad = torch.ones_like(p)


def test_plain_optim_wrapper_is_refused(repo_root, synthetic_root, tmp_path,
                                        reset_mmengine):
    cfg_path = osp.join(repo_root, CONFIGS['pirat'])
    cfg = Config.fromfile(cfg_path)
    cfg.optim_wrapper.type = 'OptimWrapper'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = synthetic_root
        cfg[loader].dataset.generator_cfg = dict(
            splits=dict(train=48, val=16))
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False
    cfg.work_dir = str(tmp_path)
    cfg.load_from = None
    runner = Runner.from_cfg(cfg)
    with pytest.raises(TypeError, match='AdversarialOptimWrapper'):
        runner.train()


ITERS = ['load_from=None', 'train_cfg.val_interval=100',
         'default_hooks.checkpoint.interval=3',
         'default_hooks.logger.interval=1', 'param_scheduler.0.end=2',
         'param_scheduler.1.begin=2', 'param_scheduler.1.end=6',
         'train_dataloader.batch_size=4']


def test_resumed_equals_uninterrupted(run_tool, repo_root, synthetic_root,
                                      data_options, tmp_path):
    cfg = CONFIGS['sat']
    opts = ITERS + data_options(synthetic_root)
    full = str(tmp_path / 'full')
    run_tool(['python', 'tools/train.py', cfg, '--work-dir', full,
              '--cfg-options', 'train_cfg.max_iters=6'] + opts)
    part = str(tmp_path / 'part')
    run_tool(['python', 'tools/train.py', cfg, '--work-dir', part,
              '--cfg-options', 'train_cfg.max_iters=3'] + opts)
    out = run_tool(['python', 'tools/train.py', cfg, '--work-dir', part,
                    '--resume', '--cfg-options', 'train_cfg.max_iters=6'] +
                   opts)
    assert 'Restored the random state saved at iteration 3' in out
    a = torch.load(osp.join(full, 'iter_6.pth'), weights_only=True)
    b = torch.load(osp.join(part, 'iter_6.pth'), weights_only=True)
    for key, value in a['state_dict'].items():
        assert torch.equal(value, b['state_dict'][key]), key


def test_two_process_gloo_training(run_tool, synthetic_root, data_options,
                                   tmp_path):
    work = str(tmp_path / 'dist')
    out = run_tool(
        ['bash', 'tools/dist_train.sh', CONFIGS['pirat'], '2', '--work-dir',
         work, '--cfg-options', 'train_cfg.max_iters=4'] + ITERS +
        data_options(synthetic_root),
        env=dict(PORT='29671', CUDA_VISIBLE_DEVICES=''))
    assert 'Distributed training: True' in out and 'GPU number: 2' in out
    assert 'adv.acc' in out and 'attack_time_share' in out
    assert osp.exists(osp.join(work, 'iter_4.pth'))


def test_adversarial_val_loop_monitors_robustness(run_tool, repo_root,
                                                  synthetic_root, data_options,
                                                  tmp_path):
    cfg = tmp_path / 'pirat_advval.py'
    cfg.write_text(
        f"_base_ = '{osp.join(repo_root, CONFIGS['pirat'])}'\n"
        "val_cfg = dict(_delete_=True, type='AdversarialValLoop', eps=4,\n"
        "               attacks=[dict(type='PGD', steps=2)])\n"
        "val_evaluator = dict(_delete_=True, type='RobustnessMetric',\n"
        "                     name='PGD', worst_case_modes=['best'])\n")
    out = run_tool(
        ['python', 'tools/train.py', str(cfg), '--work-dir',
         str(tmp_path / 'work'), '--cfg-options', 'train_cfg.max_iters=2',
         'train_cfg.val_interval=2'] +
        [o for o in ITERS if not o.startswith('train_cfg.val_interval')] +
        data_options(synthetic_root))
    assert 'eps4/PGD/mIoU' in out and 'Iter(val)' in out


def _variable_size_batch(sizes, num_classes=5, seed=0):
    """A training batch as the loader gives it after RandomResize + RandomCrop
    without Pad: uint8 images of different sizes, labels with void pixels."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i, (h, w) in enumerate(sizes):
        inputs.append(
            torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
        label = torch.randint(0, num_classes, (1, h, w), generator=g)
        label[:, :2] = 255
        sample = SegDataSample(gt_sem_seg=PixelData(data=label))
        sample.set_metainfo(
            dict(img_shape=(h, w), ori_shape=(h, w), img_path=f'img{i}.png'))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _accuracy_on(loop, batch, indices):
    """Pixel accuracy (%) of the eval-mode model on ``batch``'s images
    ``indices`` (valid pixels, void excluded), recomputed from the raw inputs."""
    from mmseg_robust.models import TrainingBatchPixelView
    module = unwrap_model(loop.runner.model).eval()
    processed = module.data_preprocessor(
        dict(inputs=batch['inputs'],
             data_samples=copy.deepcopy(batch['data_samples'])), True)
    view = TrainingBatchPixelView(module, processed['inputs'],
                                  processed['data_samples']).subset(indices)
    with torch.no_grad():
        pred = view(view.images).argmax(1)
    valid = view.labels != loop.ignore_index
    if view.valid is not None:
        valid &= view.valid
    return 100 * float(((pred == view.labels) & valid).sum() / valid.sum())


@pytest.mark.parametrize('scheme', ['pirat', 'sat', 'ddcat'])
def test_padded_variable_size_batch(scheme, repo_root, synthetic_root, tmp_path,
                                    reset_mmengine):
    """Crops smaller than the preprocessor's size are padded by it; the decode
    head would resize the whole batch to image 0's unpadded size (the crash of
    mmseg's standard pipelines). The view works at the padded size, keeps the
    padding fixed and out of the losses, and returns unpadded raw inputs."""
    runner = _runner(repo_root, scheme, synthetic_root, tmp_path)
    loop = runner.train_loop
    sizes = [(46, 46), (64, 50), (30, 64), (64, 64)]
    batch = _variable_size_batch(sizes)
    original = copy.deepcopy(batch)
    adv, stats = loop.adversarial_batch(batch)
    attacked = loop.attacked_indices(len(sizes))
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
        _accuracy_on(loop, original, seen), abs=1e-4)
    if scheme != 'ddcat':  # (DDC-AT's batch keeps its clean half clean)
        assert stats['adv.acc'] == pytest.approx(
            _accuracy_on(loop, adv, attacked), abs=1e-4)
    # the update sees the composed batch without a shape error
    runner.model.train()
    runner.call_hook('before_train_epoch')
    runner.model.train_step(adv, optim_wrapper=runner.optim_wrapper)


def test_training_view_holds_the_padding(repo_root, synthetic_root, tmp_path,
                                         reset_mmengine):
    from mmseg_robust.models import TrainingBatchPixelView
    runner = _runner(repo_root, 'pirat', synthetic_root, tmp_path)
    module = unwrap_model(runner.model).eval()
    batch = _variable_size_batch([(46, 40), (64, 64)])
    processed = module.data_preprocessor(batch, True)
    view = TrainingBatchPixelView(module, processed['inputs'],
                                  processed['data_samples'])
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
    grad, = torch.autograd.grad(view(x).sum(), x)
    assert (grad[0, :, 46:] == 0).all() and (grad[0, :, :, 40:] == 0).all()
    assert grad[0, :, :46, :40].abs().sum() > 0
    # round trip to the loader's raw inputs (BGR, unpadded, 0..255)
    raw = view.raw_inputs(view.images, batch['inputs'])
    for r, b in zip(raw, batch['inputs']):
        assert r.shape == b.shape
        assert (r - b.float()).abs().max() < 1e-3


def test_ignore_index_comes_from_the_model(repo_root, synthetic_root, tmp_path,
                                           reset_mmengine):
    runner = _runner(
        repo_root, 'pirat', synthetic_root, tmp_path,
        options={'model.decode_head.ignore_index': 4})
    loop = runner.train_loop
    assert loop.ignore_index == 4 and loop.attack.ignore_index == 4
    # pixels labelled 4 are ignored by the attack and the logged accuracy
    batch = _variable_size_batch([(64, 64)] * 2)
    for s in batch['data_samples']:
        s.gt_sem_seg.data[:] = 4
    _, stats = loop.adversarial_batch(batch)
    assert stats['clean.acc'] == 0 and stats['adv.acc'] == 0


def test_ddcat_leaves_the_loader_samples_alone(repo_root, synthetic_root,
                                               tmp_path, reset_mmengine):
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


def test_leak_attack_grads_adds_the_attack_gradients(repo_root, synthetic_root,
                                                     tmp_path,
                                                     reset_mmengine):
    """Opt-in reproduction of the PIR-AT reference's quirk: each attack step
    adds d(batch-mean objective)/d(theta), in eval mode, to the parameters'
    gradients. Oracle: the same sum recomputed from the attack's iterates."""
    import torch.nn.functional as F
    options = {
        'train_cfg.attack':
        dict(type='PGD', eps=4, steps=3, step_size=2.55, random_start=False)
    }
    runner = _runner(repo_root, 'pirat', synthetic_root, tmp_path,
                     options=options)
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
    leaked = {n: p.grad.clone() for n, p in module.named_parameters()
              if p.grad is not None}
    assert len(iterates) == 3 and leaked
    # oracle: sum over the iterates of the gradient of the mean per-image
    # objective (CE summed over valid pixels / H*W), eval mode
    for p in module.parameters():
        p.grad = None
    processed = module.data_preprocessor(
        dict(inputs=batch['inputs'],
             data_samples=copy.deepcopy(batch['data_samples'])), True)
    from mmseg_robust.models import TrainingBatchPixelView
    view = TrainingBatchPixelView(module, processed['inputs'],
                                  processed['data_samples'])
    module.eval()
    b, h, w = view.labels.shape
    for x in iterates:
        logits = view(x)
        ce = F.cross_entropy(logits, view.labels, ignore_index=255,
                             reduction='none')
        (ce.sum() / (h * w) / b).backward()
    module.train()
    for n, p in module.named_parameters():
        if n in leaked:
            torch.testing.assert_close(leaked[n], p.grad, rtol=1e-4,
                                       atol=1e-6)


def test_missing_load_from_names_the_command_that_writes_it(
        repo_root, synthetic_root, tmp_path, reset_mmengine, monkeypatch):
    monkeypatch.chdir(repo_root)
    # the synthetic PIR-AT config starts from the clean model's checkpoint
    missing = 'work_dirs/upernet_convnext-micro_synthetic/iter_2000.pth'
    assert Config.fromfile(osp.join(repo_root, CONFIGS['pirat'])).load_from \
        == missing
    # raised when the loop is built (before any weight is initialised)
    with pytest.raises(FileNotFoundError) as info:
        _runner(repo_root, 'pirat', synthetic_root, tmp_path,
                options={'load_from': str(tmp_path / missing)}).train()
    msg = str(info.value)
    assert 'python tools/train.py configs/synthetic/' \
        'upernet_convnext-micro_synthetic.py' in msg
    assert '--cfg-options load_from=PATH' in msg
