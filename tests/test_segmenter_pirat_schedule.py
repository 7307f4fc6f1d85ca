"""The PIR-AT Segmenter ViT-S configs (docs/algorithms.md section 5.1): the main config
trains with the reference's schedule (Segmenter's own: SGD lr 1e-3, momentum 0.9,
weight decay 1e-5, polynomial decay of power 0.9 to 1e-5, 32 epochs of ADE20K's
20210 training images at batch 14 per GPU on 8 GPUs); the AdamW schedule of the
ADE20K UperNets is kept as a clearly named variant."""

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


def _cfg(name):
    return Config.fromfile(osp.join(PIRAT_DIR, name + '.py'))


@pytest.mark.parametrize('name', [REFERENCE, REFERENCE + '_sea'])
def test_reference_schedule(name):
    cfg = _cfg(name)
    assert cfg.train_dataloader.batch_size == 14
    opt = cfg.optim_wrapper.optimizer
    assert opt == dict(type='SGD', lr=1e-3, momentum=0.9, weight_decay=1e-5)
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    # Nothing of the AdamW base schedule survives.
    assert 'betas' not in opt and 'eps' not in opt
    (poly,) = cfg.param_scheduler
    assert poly == dict(
        type='PolyLR', power=0.9, eta_min=1e-5, by_epoch=False, begin=0, end=MAX_ITERS
    )
    assert cfg.train_cfg.max_iters == MAX_ITERS == 5760
    assert cfg.train_cfg.type == 'AdversarialTrainLoop'
    assert cfg.train_cfg.attack == dict(
        type='PGD', eps=4, steps=5, step_size=2.55, random_start=False
    )
    assert cfg.default_hooks.checkpoint.interval == cfg.train_cfg.val_interval
    assert MAX_ITERS % cfg.train_cfg.val_interval == 0


def test_reference_learning_rate_curve():
    # Segmenter's polynomial schedule, no warm-up:
    # lr(t) = (lr0 - lr_min) * (1 - t / T)^0.9 + lr_min, where mmengine's PolyLR
    # counts T = end - begin - 1 (it reaches lr_min at the last iteration, one
    # step early, as the project's other schedules).
    from mmengine.optim.scheduler import PolyLR

    cfg = _cfg(REFERENCE)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = dict(cfg.param_scheduler[0])
    sched.pop('type')
    scheduler = PolyLR(opt, **sched)
    lrs = []
    for _ in range(MAX_ITERS):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        scheduler.step()
    for t in (0, 1, MAX_ITERS // 3, MAX_ITERS // 2, MAX_ITERS - 2, MAX_ITERS - 1):
        expected = (1e-3 - 1e-5) * (1 - t / (MAX_ITERS - 1)) ** 0.9 + 1e-5
        assert lrs[t] == pytest.approx(expected, rel=1e-6), t
    assert opt.param_groups[0]['lr'] == pytest.approx(1e-5)


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
