# UperNet on ConvNeXt-T with the convolutional stem (CvSt), as the SEA/PIR-AT models
# (docs/algorithms.md sections 5.1 and 6): raw [0, 1] RGB input (no mean/std
# normalisation), UperNet with 512 channels and PPM scales 1, 2, 3, 6, an FCN
# auxiliary head on stage 3 (384 -> 256 channels) with loss weight 0.4.
# Differences to mmseg's UperNet-ConvNeXt configs, all taken from the reference:
# no dropout before the classifiers, plain (per-GPU) BN, the CE averaged over the
# labelled pixels only. Configs set `num_classes` and the preprocessor's `size`.
norm_cfg = dict(type='BN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    # pixel / 255: the models see RGB in [0, 1] (the attacks' pixel space)
    mean=[0.0, 0.0, 0.0],
    std=[255.0, 255.0, 255.0],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(512, 512),
)  # set to the dataset's crop size
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='ConvNeXtCvSt',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.4,
        gap_before_final_norm=False,
    ),
    decode_head=dict(
        type='UPerHead',
        in_channels=[96, 192, 384, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.0,
        num_classes=21,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss',
            use_sigmoid=False,
            loss_weight=1.0,
            avg_non_ignore=True,
        ),
    ),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=384,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.0,
        num_classes=21,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss',
            use_sigmoid=False,
            loss_weight=0.4,
            avg_non_ignore=True,
        ),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'),
)
