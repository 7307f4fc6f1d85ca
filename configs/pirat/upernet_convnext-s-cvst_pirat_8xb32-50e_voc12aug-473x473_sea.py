# SEA evaluation (docs/algorithms.md section 4) of the PIR-AT UperNet-ConvNeXt-S-CvSt on
# PASCAL-VOC 2012 (+SBD aug): APGD with the progressive radius schedule and
# Mask-CE-Bal, Mask-CE, JS-Avg (300 iterations each) at L-inf eps 4/255 and 8/255,
# worst case per image; clean numbers too. Centre 473x473 crops (section 5.1).
# Published SEA mIoU (Croce, Singh & Hein, ECCV 2024), clean / eps 4/255 / eps 8/255:
#   76.6 / 66.0 / 36.4  (the released checkpoint's README: 76.6 / 66.2 / 38.0).
# These numbers come from the reference trainer, whose attack gradients leak into
# the update: the training config
#   upernet_convnext-s-cvst_pirat-leak_8xb32-50e_voc12aug-473x473.py
# SEA evaluates a checkpoint of either training config the same way.
# Run: python tools/test.py THIS_CONFIG CHECKPOINT [--launcher ...]
_base_ = [
    './upernet_convnext-s-cvst_pirat_8xb32-50e_voc12aug-473x473.py',
    '../_base_/evaluators/sea.py',
]
# The weights come from the tested checkpoint.
model = dict(backbone=dict(init_cfg=None))
# SEA as configs/_base_/evaluators/sea.py sets it up (eps 4 and 8/255, 300
# iterations per attack), with the dataset's Mask-CE-Bal class weights.
test_cfg = dict(_delete_=True, **_base_.robustness_test_cfg)
test_cfg['attacks'][0]['class_weights'] = 'voc'
test_evaluator = dict(_delete_=True, **_base_.robustness_evaluator)
# All crops have one size, so images can share a batch.
test_dataloader = dict(batch_size=8)
