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
}


def _runner(repo_root, scheme, synthetic_root, work_dir, batch_size=4):
    cfg = Config.fromfile(osp.join(repo_root, CONFIGS[scheme]))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = synthetic_root
        cfg[loader].dataset.generator_cfg = dict(
            splits=dict(train=48, val=16))
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False
    cfg.train_dataloader.batch_size = batch_size
    cfg.load_from = None
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'{scheme}_{id(cfg)}'
    runner = Runner.from_cfg(cfg)
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    runner.param_schedulers = runner.build_param_scheduler(
        runner.param_schedulers)
    return runner


@pytest.fixture
def reset_singletons():
    yield
    from mmengine.logging import MessageHub, MMLogger
    from mmengine.registry import DefaultScope
    from mmengine.visualization import Visualizer
    for cls in (MMLogger, MessageHub, Visualizer, DefaultScope):
        cls._instance_dict.clear()


@pytest.mark.parametrize('scheme', ['pirat', 'sat'])
def test_batch_composition(scheme, repo_root, synthetic_root, tmp_path,
                           reset_singletons):
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
        repo_root, synthetic_root, tmp_path, reset_singletons):
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
                                                    reset_singletons):
    runner = _runner(repo_root, 'pirat', synthetic_root, tmp_path)
    p = next(runner.model.parameters())
    with pytest.raises(RuntimeError, match='parameter gradient changed'):
        with runner.optim_wrapper.attack_context(runner.model):
            p.grad = torch.ones_like(p)


def test_plain_optim_wrapper_is_refused(repo_root, synthetic_root, tmp_path,
                                        reset_singletons):
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
