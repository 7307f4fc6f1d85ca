# SAT PSPNet on Cityscapes (./pspnet_r50-d8_sat_cityscapes-449x449.py),
# evaluated with the test protocol of the SAT/DDC-AT papers (Xu, Zhao & Jia, ICCV
# 2021: the semseg toolbox's test script; docs/algorithms.md section 5.2) instead
# of mmseg's slide inference: softmax probabilities (mmseg: logits) averaged over
# 449x449 windows at stride 300 (2/3 overlap), an image smaller than the window
# padded to it with the mean (mmseg: smaller windows), each window averaged with its
# horizontal mirror (mmseg: no flip), the probabilities resized bilinearly
# (align_corners=False) to the output size.
# The float image and the label (nearest) are resized to 1024x512 and scored there
# (the base config scores the full-resolution 2048x1024 labels).
# Training fields are the base config's; this file changes the evaluation only:
#   tools/test.py THIS_CONFIG CKPT [--cfg-options evaluator=SEA]
_base_ = './pspnet_r50-d8_sat_cityscapes-449x449.py'
crop_size = (449, 449)
model = dict(
    type='SlideSoftmaxEncoderDecoder',
    test_cfg=dict(
        _delete_=True,
        mode='slide_softmax',
        crop_size=crop_size,
        stride_rate=2 / 3,
        flip=True,
    ),
)
val_dataloader = dict(dataset=dict(pipeline=_base_.reference_test_pipeline))
test_dataloader = val_dataloader
