# DDC-AT (Xu, Zhao & Jia, ICCV 2021; docs/algorithms.md section 5.3): DeepLabv3,
# deep-stem ResNet-50, output stride 8, on Cityscapes fine train, crop 449, 400 epochs x
# 186 iterations (2975 images / batch 16), batch 16 = 2/GPU x 8 GPUs. Training as SAT
# plus the DDC-AT branches: cls1 (kept), cls2 and the router mask1, trained with
# CE(routed output) + 1.0 CE(mask1, division labels) + 0.4 CE(aux).
# Published numbers: the clean and BIM mIoU of the DDC-AT paper's Cityscapes table are
# not restated here (they could not be checked against the paper); copy them from it
# before quoting them. docs/algorithms.md reports SEA numbers for the VOC models only.
# Deploy: tools/model_converters/export_ddcat.py CONFIG CKPT OUT (drops cls2/mask1:
# a plain DeepLabv3, loadable with
# ../sat/deeplabv3_r50-d8_sat_cityscapes-449x449.py).
_base_ = '../sat/deeplabv3_r50-d8_sat_cityscapes-449x449.py'
model = dict(decode_head=dict(type='DDCATASPPHead', loss_mask_weight=1.0))
train_cfg = dict(scheme='ddcat')
