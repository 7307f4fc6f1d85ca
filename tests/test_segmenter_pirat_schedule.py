"""The PIR-AT Segmenter ViT-S configs (docs/algorithms.md section 5.1): the main config
trains with the reference's schedule as its code runs it (Segmenter's own: timm's
opt='sgd', i.e. SGD with Nesterov momentum, lr 1e-3, momentum 0.9, weight decay 1e-5;
polynomial decay of power 0.9 towards 1e-5 over a horizon of 32 x (25574 // 14) =
58,432 iterations, stopped after 32 epochs of ADE20K's 20210 training images at batch
14 per GPU on 8 GPUs = 5760 iterations); the AdamW schedule of the ADE20K UperNets is
kept as a clearly named variant."""

import os.path as osp

import pytest
import torch
from mmengine.config import Config

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PIRAT_DIR = osp.join(REPO, 'configs', 'pirat')
REFERENCE = 'segmenter_vit-s_pirat_8xb14-32e_ade20k151-512x512'
VARIANT = 'segmenter_vit-s_pirat-adamw_8xb16-128e_ade20k151-512x512'
ITERS_PER_EPOCH = 20210 // (8 * 14)  # 180
MAX_ITERS = 32 * ITERS_PER_EPOCH  # 5760
POLY_ITERS = 32 * (25574 // 14)  # 58432, the reference scheduler's iter_max


def _cfg(name):
    return Config.fromfile(osp.join(PIRAT_DIR, name + '.py'))


@pytest.mark.parametrize('name', [REFERENCE, REFERENCE + '_sea'])
def test_reference_schedule(name):
    cfg = _cfg(name)
    assert cfg.train_dataloader.batch_size == 14
    opt = cfg.optim_wrapper.optimizer
    assert opt == dict(
        type='SGD', lr=1e-3, momentum=0.9, weight_decay=1e-5, nesterov=True
    )
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    # Nothing of the AdamW base schedule survives.
    assert 'betas' not in opt and 'eps' not in opt
    (poly,) = cfg.param_scheduler
    assert poly == dict(
        type='PolyLR',
        power=0.9,
        eta_min=1e-5,
        by_epoch=False,
        begin=0,
        end=POLY_ITERS + 1,
    )
    assert cfg.train_cfg.max_iters == MAX_ITERS == 5760
    assert cfg.train_cfg.type == 'AdversarialTrainLoop'
    assert cfg.train_cfg.attack == dict(
        type='PGD', eps=4, steps=5, step_size=2.55, random_start=False
    )
    assert cfg.default_hooks.checkpoint.interval == cfg.train_cfg.val_interval
    assert MAX_ITERS % cfg.train_cfg.val_interval == 0


def _reference_lr(t):
    """Segmenter's PolynomialLR (no warm-up) at iteration ``t``:
    ``(lr - min_lr) * (1 - t / iter_max) ** power + min_lr``."""
    return (1e-3 - 1e-5) * (1 - t / POLY_ITERS) ** 0.9 + 1e-5


def test_reference_optimizer_and_learning_rate_curve():
    """The optimizer wrapper and LR scheduler built from the config by mmengine's
    builders, stepped as the train loop steps them: Nesterov SGD, and the
    reference's LR at every iteration, 9.117e-4 at the last one (5759)."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS, init_default_scope

    init_default_scope('mmseg')
    cfg = _cfg(REFERENCE)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.LayerNorm(6), torch.nn.Conv2d(4, 2, 1)
    )
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    assert type(wrapper.optimizer) is torch.optim.SGD
    groups = wrapper.optimizer.param_groups
    assert groups and all(g['nesterov'] and g['momentum'] == 0.9 for g in groups)
    schedulers = [
        PARAM_SCHEDULERS.build(dict(s, optimizer=wrapper)) for s in cfg.param_scheduler
    ]
    lrs = []
    for _ in range(cfg.train_cfg.max_iters):
        lrs.append(groups[0]['lr'])
        model(torch.rand(1, 3, 8, 8)).sum().backward()
        wrapper.step()
        wrapper.zero_grad()
        for s in schedulers:
            s.step()
    assert len(lrs) == MAX_ITERS
    assert lrs[MAX_ITERS - 1] == pytest.approx(9.117e-4, abs=1e-6)
    for t in (0, 1, MAX_ITERS // 3, MAX_ITERS // 2, MAX_ITERS - 2, MAX_ITERS - 1):
        assert lrs[t] == pytest.approx(_reference_lr(t), rel=1e-9), t
    # every parameter group follows the curve (no group keeps another lr)
    assert {g['lr'] for g in groups} == {groups[0]['lr']}
    # the mean LR is 1.8x that of a decay to 1e-5 within the 5760 iterations
    truncated = [
        (1e-3 - 1e-5) * (1 - t / (MAX_ITERS - 1)) ** 0.9 + 1e-5
        for t in range(MAX_ITERS)
    ]
    assert sum(lrs) / sum(truncated) == pytest.approx(1.80, abs=0.005)


def test_adamw_variant_is_kept_and_labelled():
    cfg = _cfg(VARIANT)
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', 1e-4, 0.05)
    assert cfg.train_dataloader.batch_size == 16
    assert cfg.train_cfg.max_iters == 128 * (20210 // (8 * 16))
    with open(osp.join(PIRAT_DIR, VARIANT + '.py')) as f:
        assert f.read().startswith('# Our variant, not the reference')
    sea = _cfg(VARIANT + '_sea')
    assert sea.optim_wrapper.optimizer.type == 'AdamW'
    assert sea.model.backbone.init_cfg is None


def test_old_names_are_gone():
    for suffix in ('', '_sea'):
        old = 'segmenter_vit-s_pirat_8xb16-128e_ade20k151-512x512' + suffix
        assert not osp.exists(osp.join(PIRAT_DIR, old + '.py'))
