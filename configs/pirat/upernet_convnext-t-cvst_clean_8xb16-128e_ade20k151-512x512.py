# Clean training (the PIR-AT papers' baseline): UperNet-ConvNeXt-T-CvSt on ADE20K (151
# classes), backbone initialised from the clean ImageNet ConvNeXt-T-CvSt of
# revisiting-at (the init of its adversarial training), same schedule and data as
# PIR-AT.
# Published numbers: none in docs/algorithms.md section 4 for this model; clean
# training gives no robustness (SEA drives such models to about 0 mIoU).
# Evaluate with upernet_convnext-t-cvst_clean_8xb16-128e_ade20k151-512x512_sea.py.
_base_ = [
    '../_base_/models/upernet_convnext_cvst.py',
    '../_base_/datasets/ade20k151_512x512.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/adamw_warmup-poly_8xb16-128e_ade20k.py',
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch='tiny',
        drop_path_rate=0.4,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/revisiting_at/convnext_t_cvst_clean.pth',
        ),
    ),
    decode_head=dict(num_classes=151),
    auxiliary_head=dict(num_classes=151),
)
