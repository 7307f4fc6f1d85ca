# The short name of the project's headline recipe: PIR-AT UperNet-ConvNeXt-T-CvSt on
# ADE20K (151 classes), 8 GPUs x 16 images, 128 epochs, crop 512. Identical to
#   upernet_convnext-t-cvst_pirat_8xb16-128e_ade20k151-512x512.py
# (see that file for the recipe and the published numbers), so that
#   tools/dist_train.sh configs/pirat/upernet_convnext_t_ade20k.py 8
# trains it. Evaluate with
#   tools/test.py configs/pirat/upernet_convnext_t_ade20k.py CKPT \
#       --cfg-options evaluator=SEA
_base_ = './upernet_convnext-t-cvst_pirat_8xb16-128e_ade20k151-512x512.py'
