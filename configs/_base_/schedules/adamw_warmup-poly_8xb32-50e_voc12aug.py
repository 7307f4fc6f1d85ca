# SEA/PIR-AT schedule for PASCAL-VOC (docs/algorithms.md section 5.1): AdamW, lr 1e-3,
# weight decay 0.01 (none on norms and 1-d parameters), 50 epochs of 10582 images
# at 8 GPUs x 32 (41 iterations per epoch), 10 warm-up epochs (linear from
# 1e-5 x lr) then linear decay to 0 (the reference's WarmupPolyLR, power 1).
# Clean training; the PIR-AT configs switch the train loop.
train_images = 10582
iters_per_epoch = train_images // (8 * 32)
max_epochs = 50
warmup_epochs = 10
max_iters = max_epochs * iters_per_epoch
warmup_iters = warmup_epochs * iters_per_epoch
val_interval = 10 * iters_per_epoch
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01
    ),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-5, by_epoch=False, begin=0, end=warmup_iters),
    dict(
        type='PolyLR',
        power=1.0,
        eta_min=0.0,
        by_epoch=False,
        begin=warmup_iters,
        end=max_iters,
    ),
]
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=val_interval
)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=val_interval, max_keep_ckpts=2
    ),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'),
)
