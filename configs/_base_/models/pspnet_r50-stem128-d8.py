# PSPNet on the deep-stem ResNet-50 of hszhao/semseg, as trained by SAT and DDC-AT
# (Xu, Zhao & Jia, ICCV 2021; reference dvlab-research/Robust-Semantic-Segmentation,
# docs/algorithms.md section 5.3). Differences from mmseg's pspnet_r50-d8:
# - stem 3->64->64->128 (stem_channels=128; mmseg's resnet50_v1c is 32-32-64);
# - every block of layer3/layer4 dilated 2/4 (contract_dilation=False);
# - align_corners=True, CE averaged over non-ignored pixels (as torch's
#   CrossEntropyLoss(ignore_index=255) of the reference);
# - ImageNet initialisation: the reference's resnet50_v2.pth, converted with
#   tools/model_converters/ddcat_semseg.py (mmseg's v1c weights do not fit the stem),
#   loaded strictly ('PretrainedStrict': a wrong file raises, naming the tensors;
#   mmengine's 'Pretrained' would warn and train from random weights).
# Output stride 8, sliding-window test with 2/3 overlap (crop set by the dataset
# config).
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],  # ImageNet mean/std on 0..255, RGB
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='ResNetV1c',
        depth=50,
        stem_channels=128,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 2, 4),
        strides=(1, 2, 1, 1),
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        contract_dilation=False,
        init_cfg=dict(
            type='PretrainedStrict',
            checkpoint='checkpoints/semseg_resnet50_v2_backbone.pth',
        ),
    ),
    decode_head=dict(
        type='PSPHead',
        in_channels=2048,
        in_index=3,
        channels=512,
        pool_scales=(1, 2, 3, 6),
        dropout_ratio=0.1,
        num_classes=21,
        norm_cfg=norm_cfg,
        align_corners=True,
        loss_decode=dict(
            type='CrossEntropyLoss',
            use_sigmoid=False,
            loss_weight=1.0,
            avg_non_ignore=True,
        ),
    ),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=1024,
        in_index=2,
        channels=256,
        num_convs=1,
        kernel_size=3,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=21,
        norm_cfg=norm_cfg,
        align_corners=True,
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
