# SEA evaluation (docs/algorithms.md section 4) of our AdamW variant of the PIR-AT
# Segmenter ViT-S on ADE20K (151 classes; not the reference schedule, see the training
# config): APGD with the progressive radius schedule and Mask-CE-Bal, Mask-CE, JS-Avg
# (300 iterations each) at L-inf eps 4/255 and 8/255, worst case per image; clean
# numbers too. Centre 512x512 crops (section 5.1).
# Published numbers: none for this variant (see the training config).
# Run: python tools/test.py THIS_CONFIG CHECKPOINT [--launcher ...]
_base_ = [
    './segmenter_vit-s_pirat-adamw_8xb16-128e_ade20k151-512x512.py',
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
