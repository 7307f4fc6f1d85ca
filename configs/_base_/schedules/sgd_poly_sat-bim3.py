# SAT / DDC-AT schedule of the reference (docs/algorithms.md sections 5.2, 5.3): SGD lr
# 0.01, momentum 0.9, weight decay 1e-4, heads at 10x lr, poly decay (power 0.9) to 0
# over the whole run; adversarial training with BIM, 3 steps of 0.01 (2.55/255) inside
# eps 0.03 (7.65/255), no random start, CE on the main head; per GPU the first half
# of the batch stays clean, the second half is adversarial. The dataset configs set
# max_iters (epochs x iterations per epoch at batch 16) in the top-level configs.
max_iters = 1000  # placeholder, set by every top-level config
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4),
    paramwise_cfg=dict(
        custom_keys=dict(
            decode_head=dict(lr_mult=10.0), auxiliary_head=dict(lr_mult=10.0)
        )
    ),
)
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(
    type='AdversarialTrainLoop',
    scheme='sat',
    attack=dict(type='BIM', eps=7.65, steps=3, step_size=2.55),
    max_iters=max_iters,
    val_interval=max_iters // 10,
)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters // 10),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'),
)
