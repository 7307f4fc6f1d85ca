# SAT (ALGORITHMS.md 5.2) on the synthetic dataset: per GPU, first half of the batch
# clean, second half adversarial (BIM, 3 steps of 2.55/255, eps 7.65/255 = 0.03,
# no random start, CE of the main head); labels unchanged.
_base_ = './upernet_convnext-micro_synthetic.py'

train_cfg = dict(
    _delete_=True,
    type='AdversarialTrainLoop',
    scheme='sat',
    max_iters={{_base_.max_iters}},
    val_interval=500,
    attack=dict(type='BIM', eps=7.65, steps=3, step_size=2.55))
optim_wrapper = dict(type='AdversarialOptimWrapper')
