# DDC-AT PSPNet on PASCAL VOC 2012 (./pspnet_r50-d8_ddcat_voc12aug-473x473.py),
# evaluated with the test protocol of the SAT/DDC-AT papers (Xu, Zhao & Jia, ICCV
# 2021: the semseg toolbox's test script; docs/algorithms.md section 5.2) instead
# of mmseg's slide inference: softmax probabilities (mmseg: logits) averaged over
# 473x473 windows at stride 316 (2/3 overlap), an image smaller than the window
# padded to it with the mean (mmseg: smaller windows), each window averaged with its
# horizontal mirror (mmseg: no flip), the probabilities resized bilinearly
# (align_corners=False) to the output size.
# The windows' logits are cls1's, the deployed branch (section 5.3).
# The float image's long side is resized to 512; the prediction is scored at the
# original resolution, as with the base config.
# The reference's VOC training set (SBD train+val) contains at least 773 of the
# 1,449 VOC2012 val images; this config family trains on train_aug, which holds none.
# Training fields are the base config's; this file changes the evaluation only:
#   tools/test.py THIS_CONFIG CKPT [--cfg-options evaluator=SEA]
_base_ = './pspnet_r50-d8_ddcat_voc12aug-473x473.py'
crop_size = (473, 473)
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
