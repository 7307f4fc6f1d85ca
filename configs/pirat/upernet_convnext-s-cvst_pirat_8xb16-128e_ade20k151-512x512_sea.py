# SEA evaluation (docs/algorithms.md section 4) of the PIR-AT UperNet-ConvNeXt-S-CvSt on
# ADE20K (151 classes): APGD with the progressive radius schedule and Mask-CE-Bal,
# Mask-CE, JS-Avg (300 iterations each) at L-inf eps 4/255 and 8/255, worst case per
# image; clean numbers too. Centre 512x512 crops (section 5.1).
# Published SEA mIoU (Croce, Singh & Hein, ECCV 2024), clean / eps 4/255 / eps 8/255:
#   32.1 / 17.9 / 5.4  (the released checkpoint's README: 32.1 / 19.2 / 7.20).
# These numbers come from the reference trainer, whose attack gradients leak into
# the update: the training config
#   upernet_convnext-s-cvst_pirat-leak_8xb16-128e_ade20k151-512x512.py
# SEA evaluates a checkpoint of either training config the same way.
# Run: python tools/test.py THIS_CONFIG CHECKPOINT [--launcher ...]
_base_ = [
    './upernet_convnext-s-cvst_pirat_8xb16-128e_ade20k151-512x512.py',
    '../_base_/evaluators/sea.py',
]
# The weights come from the tested checkpoint.
model = dict(backbone=dict(init_cfg=None))
# SEA as configs/_base_/evaluators/sea.py sets it up (eps 4 and 8/255, 300
# iterations per attack), with the dataset's Mask-CE-Bal class weights.
test_cfg = dict(_delete_=True, **_base_.robustness_test_cfg)
test_cfg['attacks'][0]['class_weights'] = 'ade20k'
test_evaluator = dict(_delete_=True, **_base_.robustness_evaluator)
# All crops have one size, so images can share a batch.
test_dataloader = dict(batch_size=8)
