# DeepLabv3 on the deep-stem ResNet-50 of hszhao/semseg, as trained by SAT and DDC-AT
# (reference dvlab-research/Robust-Semantic-Segmentation, docs/algorithms.md section
# 5.3): ASPP with a 1x1 branch, atrous rates 6/12/18 and image pooling (256 channels
# each), fused by a 1x1 bottleneck (DeepLabV3Head; mmseg's ASPPHead uses 3x3), auxiliary
# head 1x1 conv 1024->256 on layer3. Backbone and losses as pspnet_r50-stem128-d8.py.
_base_ = './pspnet_r50-stem128-d8.py'
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    decode_head=dict(
        _delete_=True,
        type='DeepLabV3Head',
        in_channels=2048,
        in_index=3,
        channels=256,
        dilations=(1, 6, 12, 18),
        bottleneck_kernel_size=1,
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
    auxiliary_head=dict(kernel_size=1),
)
