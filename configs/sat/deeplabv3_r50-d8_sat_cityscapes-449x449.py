# SAT (standard adversarial training of Xu, Zhao & Jia, "Dynamic Divide-and-Conquer
# Adversarial Training for Robust Semantic Segmentation", ICCV 2021; docs/algorithms.md
# section 5.2): DeepLabv3, deep-stem ResNet-50, output stride 8, on Cityscapes fine
# train, crop 449, 400 epochs x 186 iterations (2975 images / batch 16), batch 16 =
# 2/GPU x 8 GPUs. Per GPU the first half of each batch is clean, the second half
# BIM-adversarial (eps 0.03, 3 steps of 0.01).
# Published numbers: the clean and BIM mIoU of the DDC-AT paper's Cityscapes table are
# not restated here (they could not be checked against the paper); copy them from it
# before quoting them. docs/algorithms.md reports SEA numbers for the VOC models only.
_base_ = [
    '../_base_/models/deeplabv3_r50-stem128-d8.py',
    '../_base_/datasets/cityscapes_449x449.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/sgd_poly_sat-bim3.py',
]
crop_size = (449, 449)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    decode_head=dict(num_classes=19),
    auxiliary_head=dict(num_classes=19),
    # mmseg's slide inference with the reference's windows (stride = 2/3 of the
    # crop); the reference's own protocol (softmax average over mean-padded
    # windows, flip) is the *_reference-protocol.py variant of this config
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(300, 300)),
)
max_iters = 74400
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=7440)
default_hooks = dict(checkpoint=dict(interval=7440))
