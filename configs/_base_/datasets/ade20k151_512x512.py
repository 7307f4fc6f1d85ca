# ADE20K (SceneParsing, 20210 training / 2000 validation images) in the SEA/PIR-AT
# protocol (docs/algorithms.md section 5.1): 151 classes, label 0 ("other") kept;
# training: scale [0.5, 2] of a 520 short side, random 512x512 crop, flip, Gaussian
# blur p=0.5; evaluation: short side resized to 512, centre 512x512 crop. Prepare
# the data as mmseg's dataset_prepare.md ("ADE20K"); see docs/datasets.md.
dataset_type = 'ADE20K151Dataset'
data_root = 'data/ade/ADEChallengeData2016'
crop_size = (512, 512)
num_classes = 151
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(
        type='RandomResize',
        scale=(2080, 520),
        ratio_range=(0.5, 2.0),
        keep_ratio=True,
        backend='pillow',
    ),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=1.0),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomGaussianBlur', prob=0.5, max_radius=1.0),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='ShortEdgeResizeCenterCrop', crop_size=512, backend='pillow'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=16,  # per GPU, 8 GPUs: 128 images per step
    num_workers=8,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(
            img_path='images/training', seg_map_path='annotations/training'
        ),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(
            img_path='images/validation', seg_map_path='annotations/validation'
        ),
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
