# DDC-AT (docs/algorithms.md 5.3) on the synthetic dataset: the SAT config of the small
# UperNet-ConvNeXt (same attack, schedule and initialisation) with the DDC-AT
# decode head. cls1 = UPerHead's fpn_bottleneck + conv_seg (kept at inference);
# cls2 and the router mask1 read the same FPN concatenation (their weights start
# fresh when load_from is a plain model). Per iteration BIM (3 steps of 2.55/255,
# eps 7.65/255, no random start, CE of cls1) on the whole batch gives the division
# labels; the batch is the first half clean, the second half adversarial.
# Loss = CE(routed, y) + 1.0 * CE(mask1, division) + 0.4 * CE(aux).
# tools/model_converters/export_ddcat.py turns a checkpoint into the plain UperNet
# (cls1 only).
_base_ = './upernet_convnext-micro_sat_synthetic.py'

model = dict(decode_head=dict(type='DDCATUPerHead', loss_mask_weight=1.0))
train_cfg = dict(
    type='AdversarialTrainLoop',
    scheme='ddcat',
    attack=dict(type='BIM', eps=7.65, steps=3, step_size=2.55),
)
optim_wrapper = dict(type='OptimWrapper')
