# SEA, the Segmentation Ensemble Attack (Croce, Singh & Hein, ECCV 2024;
# docs/algorithms.md section 4): APGD with the progressive radius schedule and the
# losses Mask-CE-Bal, Mask-CE and JS-Avg, 300 iterations each, worst case per
# image, at L-inf eps 4/255 and 8/255.
#
# `tools/test.py CFG CKPT --cfg-options evaluator=SEA` uses this file; a config
# inherits it next to its own base and sets the dataset's class weights:
#   _base_ = ['./my_config.py', '../_base_/evaluators/sea.py']
#   test_cfg = dict(_delete_=True, **_base_.robustness_test_cfg)
#   test_cfg['attacks'][0]['class_weights'] = 'voc'  # or 'ade20k', [w_0, ...]
#   test_evaluator = dict(_delete_=True, **_base_.robustness_evaluator)
robustness_test_cfg = dict(
    type='AdversarialTestLoop',
    attacks=[dict(type='SEA', steps=300)],
    eps=[4, 8],
    seed=0,
    resume=True,
    log_interval=1,
)
robustness_evaluator = dict(
    type='RobustnessMetric', name='SEA', seed=0, worst_case_modes=['best', 'reference']
)
