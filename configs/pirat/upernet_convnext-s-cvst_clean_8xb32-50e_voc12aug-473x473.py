# Clean training (the PIR-AT papers' baseline): UperNet-ConvNeXt-S-CvSt on PASCAL-VOC
# 2012 (+SBD aug), backbone initialised from the clean ImageNet ConvNeXt-S-CvSt of
# revisiting-at (the init of its adversarial training), same schedule and data as
# PIR-AT.
# Published numbers: none in docs/algorithms.md section 4 for this model; clean
# training gives no robustness (SEA drives such models to about 0 mIoU).
# Evaluate with upernet_convnext-s-cvst_clean_8xb32-50e_voc12aug-473x473_sea.py.
# Same as the ConvNeXt-T config but for the backbone: ConvNeXt-S-CvSt, drop path 0.3.
_base_ = './upernet_convnext-t-cvst_clean_8xb32-50e_voc12aug-473x473.py'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/revisiting_at/convnext_s_cvst_clean.pth',
        ),
    )
)
