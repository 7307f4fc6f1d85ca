# Our variant, not the reference: PIR-AT (docs/algorithms.md section 5.1) of the
# Segmenter ViT-S on ADE20K (151 classes) with the schedule of the ADE20K UperNets
# (AdamW lr 1e-4, weight decay 0.05, 128 epochs, 5 warm-up epochs, batch 16/GPU x 8).
# The reference trains this model with Segmenter's own SGD schedule:
# segmenter_vit-s_pirat_8xb14-32e_ade20k151-512x512.py. Model, initialisation (the
# L-inf 4/255 robust ImageNet ViT-S, position embeddings resized from 14x14 to 32x32
# bilinearly at load) and training attack (PGD, L-inf eps 4/255, 5 steps of
# 2.55/255, no random start) are the reference's.
# Published numbers: none for this variant (the published SEA mIoU of the Segmenter,
# 28.7 / 14.9 / 5.3, belong to the reference schedule).
# Evaluate with segmenter_vit-s_pirat-adamw_8xb16-128e_ade20k151-512x512_sea.py.
_base_ = [
    '../_base_/models/segmenter_vit-s_mask.py',
    '../_base_/datasets/ade20k151_512x512.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/adamw_warmup-poly_8xb16-128e_ade20k.py',
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        init_cfg=dict(
            type='Pretrained', checkpoint='checkpoints/revisiting_at/vit_s_linf4.pth'
        )
    ),
    decode_head=dict(num_classes=151),
)
# No weight decay on norms, 1-d parameters, position embedding and class tokens.
optim_wrapper = dict(
    type='OptimWrapper',
    paramwise_cfg=dict(
        custom_keys=dict(
            pos_embed=dict(decay_mult=0.0),
            cls_token=dict(decay_mult=0.0),
            cls_emb=dict(decay_mult=0.0),
        )
    ),
)
train_cfg = dict(
    type='AdversarialTrainLoop',
    scheme='pirat',
    attack=dict(type='PGD', eps=4, steps=5, step_size=2.55, random_start=False),
)
