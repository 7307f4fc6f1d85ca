# PASCAL VOC 2012 + SBD (train_aug, 10582 images) with the augmentation of the
# DDC-AT / semseg reference (voc2012_*.yaml): random scale 0.5-2 (VOC images have a
# long side of 500), rotation +-10 deg (p=0.5, padded with the mean), Gaussian blur
# (p=0.5, OpenCV 5x5 kernel, sigma from the kernel size), flip, random crop 473
# padded with the mean / 255. Test: long side resized to 512, sliding 473 windows
# with 2/3 overlap (the model's test_cfg: mmseg's slide inference, which is not
# the reference's; `reference_test_pipeline` below and the `*_reference-protocol`
# configs reproduce the reference's, docs/algorithms.md section 5.2).
# Prepare the data with mmseg's tools/dataset_converters/voc_aug.py.
dataset_type = 'PascalVOCDataset'
data_root = 'data/VOCdevkit/VOC2012'
crop_size = (473, 473)
mean_bgr = (103.53, 116.28, 123.675)  # images are loaded BGR
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(
        type='RandomResize', scale=(500, 500), ratio_range=(0.5, 2.0), keep_ratio=True
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
    dict(type='Resize', scale=(512, 512), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
# The reference's test protocol (the `*_reference-protocol.py` configs, with the
# model's test_cfg mode='slide_softmax'; docs/algorithms.md section 5.2): the float
# image is resized (long side 512, OpenCV bilinear, no rounding to uint8) and the
# prediction is scored at the original resolution.
reference_test_pipeline = [
    dict(type='LoadImageFromFile', to_float32=True),
    dict(type='Resize', scale=(512, 512), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
# train_aug = VOC train (SegmentationClass) + aug.txt (SegmentationClassAug): mmseg's
# voc_aug.py writes aug.txt = the SBD images minus VOC train and val (9118 ids) and
# trainaug.txt = all 10582; as mmseg's own pascal_voc12_aug config, the two lists
# are concatenated (1464 + 9118 = 10582 images, no VOC val image).
dataset_train = dict(
    type=dataset_type,
    data_root=data_root,
    data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
    ann_file='ImageSets/Segmentation/train.txt',
    pipeline=train_pipeline,
)
dataset_aug = dict(
    type=dataset_type,
    data_root=data_root,
    data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClassAug'),
    ann_file='ImageSets/Segmentation/aug.txt',
    pipeline=train_pipeline,
)
train_dataloader = dict(
    batch_size=2,  # per GPU; 8 GPUs = the reference's batch of 16
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='ConcatDataset', datasets=[dataset_train, dataset_aug]),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
        ann_file='ImageSets/Segmentation/val.txt',
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
