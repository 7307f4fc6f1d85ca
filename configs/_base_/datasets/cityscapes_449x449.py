# Cityscapes (fine train, 2975 images) with the augmentation of the DDC-AT reference
# (cityscapes_*.yaml): random scale 0.25-1 of 2048x1024, rotation +-10 deg (p=0.5,
# padded with the mean), Gaussian blur (p=0.5, OpenCV 5x5 kernel, sigma from the
# kernel size), flip, random crop 449. Test: resized to 1024x512 (long side 1024),
# sliding 449 windows with 2/3 overlap, scored on the full-resolution labels (mmseg's
# slide inference and scoring, which are not the reference's; see
# `reference_test_pipeline` below and the `*_reference-protocol` configs,
# docs/algorithms.md section 5.2). Prepare the labels with mmseg's
# tools/dataset_converters/cityscapes.py.
dataset_type = 'CityscapesDataset'
data_root = 'data/cityscapes/'
crop_size = (449, 449)
mean_bgr = (103.53, 116.28, 123.675)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(
        type='RandomResize',
        scale=(2048, 1024),
        ratio_range=(0.25, 1.0),
        keep_ratio=True,
    ),
    dict(type='RandomRotate', prob=0.5, degree=10, pad_val=mean_bgr, seg_pad_val=255),
    dict(type='RandomGaussianBlur', prob=0.5, kernel_size=5, sigma=0),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='Pad', size=crop_size, pad_val=dict(img=mean_bgr, seg=255)),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(1024, 512), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
# The reference's test protocol (the `*_reference-protocol.py` configs, with the
# model's test_cfg mode='slide_softmax'; docs/algorithms.md section 5.2): the float
# image (OpenCV bilinear, no rounding to uint8) and the label (nearest) are resized
# to 1024x512 and the prediction is scored there, not at 2048x1024.
reference_test_pipeline = [
    dict(type='LoadImageFromFile', to_float32=True),
    dict(type='LoadAnnotations'),
    dict(type='Resize', scale=(1024, 512), keep_ratio=False),
    dict(type='ScoreAtImageShape'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2,  # per GPU; 8 GPUs = the reference's batch of 16
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
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
        data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
