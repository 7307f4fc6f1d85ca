# PIR-AT as the published models were trained (docs/algorithms.md section 5.1): the
# recipe of
#   upernet_convnext-s-cvst_pirat_8xb32-50e_voc12aug-473x473.py
# with the objective of the reference trainer, which calls zero_grad before the attack,
# so the parameter gradients of the 5 attack steps (eval mode, batch-mean CE) are
# added to the update (train_cfg.leak_attack_grads=True; not with --amp; divided by
# the accumulation count like the loss with optim_wrapper.accumulative_counts).
# The leaked part is large: its norm was 4.4-17.8x (mean 10.4) that of the training
# gradient on the synthetic PIR-AT config's model at its start, 2.7-6.5x (mean 3.3)
# after 300 PIR-AT iterations (benchmarks/leak_ratio.py, 8 batches of 8 each).
# Published SEA mIoU (Croce, Singh & Hein, ECCV 2024), clean / eps 4/255 / eps 8/255:
#   76.6 / 66.0 / 36.4  (the released checkpoint's README: 76.6 / 66.2 / 38.0).
# These numbers come from this objective. Evaluate with the _sea config of the
# recipe above (the evaluation does not depend on the training objective).
_base_ = './upernet_convnext-s-cvst_pirat_8xb32-50e_voc12aug-473x473.py'
train_cfg = dict(leak_attack_grads=True)
