# DDC-AT (Xu, Zhao & Jia, ICCV 2021; docs/algorithms.md section 5.3): PSPNet, deep-stem
# ResNet-50, output stride 8, on PASCAL VOC 2012 train_aug, crop 473, 50 epochs x 661
# iterations (10582 images / batch 16), batch 16 = 2/GPU x 8 GPUs. Training as SAT
# plus the DDC-AT branches: cls1 (kept), cls2 and the router mask1, trained with
# CE(routed output) + 1.0 CE(mask1, division labels) + 0.4 CE(aux).
# Published numbers: SEA (Croce, Singh & Hein, ECCV 2024; docs/algorithms.md section 4)
# drives the released reference model of this config to about 0 mIoU at eps 4/255.
# The clean and BIM mIoU of the DDC-AT paper's VOC table are not restated here (they
# could not be checked against the paper); copy them from it before quoting them.
# The reference's VOC training set (SBD train+val) contains at least 773 of the
# 1,449 VOC2012 val images; this config trains on train_aug, which holds none.
# Deploy: tools/model_converters/export_ddcat.py CONFIG CKPT OUT (drops cls2/mask1:
# a plain PSPNet, loadable with
# ../sat/pspnet_r50-d8_sat_voc12aug-473x473.py).
_base_ = '../sat/pspnet_r50-d8_sat_voc12aug-473x473.py'
model = dict(decode_head=dict(type='DDCATPSPHead', loss_mask_weight=1.0))
train_cfg = dict(scheme='ddcat')
