"""Measure how large the PIR-AT reference's attack-gradient leak is: the norm of
the parameter gradients the attack steps add to the update
(``train_cfg.leak_attack_grads=True``, docs/algorithms.md section 5.1) divided by
the norm of the training gradient of the same iteration (the loss of the update
on the adversarial batch), both over all trainable parameters.

    python benchmarks/leak_ratio.py [--config CFG] [--model-config CFG --size 64]
        [--load-from CKPT] [--steps 5] [--batch 8] [--batches 3] [--out J]

Defaults: the synthetic PIR-AT config's model (randomly initialised unless
``--load-from``), PIR-AT's training attack (PGD, eps 4/255, 5 steps of
2.55/255, no random start), the first 3 synthetic batches of 8. ``--model-config``
measures another config's model (e.g. UperNet-ConvNeXt-T-CvSt) on the synthetic
batches, its heads resized to the synthetic classes.
"""

import argparse
import copy
import json
import sys
import tempfile

import torch
from mmengine.config import Config
from mmengine.runner import Runner

import mmseg_robust  # noqa: F401
from mmseg_robust.models import unwrap_model

DEFAULT_CONFIG = 'configs/synthetic/upernet_convnext-micro_pirat_synthetic.py'


def _global_norm(grads):
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def measure(runner, batch):
    """(leak norm, training-gradient norm, cosine) for one batch."""
    loop = runner.train_loop
    module = unwrap_model(runner.model)
    params = [p for p in module.parameters() if p.requires_grad]
    # the train-mode forward below updates BN running statistics: measure every
    # batch on the same model
    buffers = {k: v.clone() for k, v in module.state_dict().items()}
    module.zero_grad(set_to_none=True)
    adv, _ = loop.adversarial_batch(copy.deepcopy(batch))
    leak = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    module.zero_grad(set_to_none=True)
    # the update's gradient on the adversarial batch (train mode), as
    # train_step's backward computes it (no accumulation)
    module.train()
    data = module.data_preprocessor(adv, True)
    losses = module._run_forward(data, mode='loss')
    loss, _ = module.parse_losses(losses)
    loss.backward()
    train = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    module.zero_grad(set_to_none=True)
    module.load_state_dict(buffers)
    n_leak, n_train = _global_norm(leak), _global_norm(train)
    dot = float(sum((a.double() * b.double()).sum() for a, b in zip(leak, train)))
    return n_leak, n_train, dot / (n_leak * n_train)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--model-config', default=None)
    parser.add_argument('--size', type=int, default=None)
    parser.add_argument('--load-from', default=None)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--batches', type=int, default=3)
    parser.add_argument('--data-root', default=None)
    parser.add_argument('--out', default=None)
    args = parser.parse_args(argv)

    cfg = Config.fromfile(args.config)
    if args.model_config:
        model = Config.fromfile(args.model_config).model
        num_classes = cfg.model.decode_head.num_classes
        for head in ('decode_head', 'auxiliary_head'):
            if model.get(head):
                model[head].num_classes = num_classes
        model.backbone.pop('init_cfg', None)
        cfg.model = model
    if args.size:
        cfg.model.data_preprocessor.size = (args.size, args.size)
    cfg.load_from = args.load_from
    cfg.work_dir = tempfile.mkdtemp(prefix='leak_ratio_')
    cfg.train_cfg.attack = dict(
        type='PGD', eps=4, steps=args.steps, step_size=2.55, random_start=False
    )
    cfg.train_cfg.leak_attack_grads = True
    cfg.train_dataloader.batch_size = args.batch
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    if args.data_root:
        cfg.train_dataloader.dataset.data_root = args.data_root
    cfg.log_level = 'WARNING'
    cfg.randomness = dict(seed=0)
    runner = Runner.from_cfg(cfg)
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    if args.load_from:
        runner.load_checkpoint(args.load_from)
    rows = []
    batches = iter(runner.train_dataloader)
    for i in range(args.batches):
        n_leak, n_train, cos = measure(runner, next(batches))
        rows.append(dict(batch=i, leak_norm=n_leak, train_norm=n_train, cosine=cos))
        print(
            f'batch {i}: |leak| {n_leak:.4g}  |train| {n_train:.4g}  '
            f'ratio {n_leak / n_train:.2f}  cosine {cos:.3f}'
        )
    out = dict(
        config=args.config,
        model_config=args.model_config,
        size=args.size,
        load_from=args.load_from,
        steps=args.steps,
        batch=args.batch,
        torch=torch.__version__,
        rows=rows,
    )
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == '__main__':
    sys.exit(main() and 0)
