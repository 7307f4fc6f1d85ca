# PIR-AT scheme (ALGORITHMS.md 5.1) on the synthetic dataset: train on adversarial
# images only (PGD, L-inf eps 4/255, fixed step 2.55/255, no random start, final
# iterate, CE of the main head). The papers' robust ImageNet backbone has no
# synthetic-data counterpart, so the model starts from scratch.
_base_ = './upernet_convnext-micro_synthetic.py'

train_cfg = dict(
    _delete_=True,
    type='AdversarialTrainLoop',
    scheme='pirat',
    max_iters={{_base_.max_iters}},
    val_interval=500,
    attack=dict(
        type='PGD', eps=4, steps=2, step_size=2.55, random_start=False))
optim_wrapper = dict(type='AdversarialOptimWrapper')
