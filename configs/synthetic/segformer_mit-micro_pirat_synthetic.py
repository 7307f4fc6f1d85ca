# PIR-AT scheme (docs/algorithms.md 5.1) on the synthetic dataset for the small
# SegFormer (MiT):
# as upernet_convnext-micro_pirat_synthetic.py (train on adversarial images only:
# PGD, L-inf eps 4/255, fixed step 2.55/255, no random start, final iterate, CE of
# the main head; 300 iterations from the trained clean model).
_base_ = './segformer_mit-micro_synthetic.py'

# The clean model is written here by
# `python tools/train.py configs/synthetic/segformer_mit-micro_synthetic.py`
# or by benchmarks/train_frontier_models.py (or pass --cfg-options load_from=PATH).
load_from = 'work_dirs/segformer_mit-micro_synthetic/iter_1000.pth'
max_iters = 300
param_scheduler = [
    dict(type='LinearLR', start_factor=0.05, by_epoch=False, begin=0, end=50),
    dict(
        type='PolyLR', eta_min=0.0, power=1.0, begin=50, end=max_iters, by_epoch=False
    ),
]

train_cfg = dict(
    _delete_=True,
    type='AdversarialTrainLoop',
    scheme='pirat',
    max_iters=max_iters,
    val_interval=max_iters,
    attack=dict(type='PGD', eps=4, steps=2, step_size=2.55, random_start=False),
)
optim_wrapper = dict(type='OptimWrapper')
# intermediate checkpoints, so that an interrupted run resumes
default_hooks = dict(checkpoint=dict(interval=100))
