# Common corruptions (Hendrycks & Dietterich, ICLR 2019) as in the segmentation
# benchmark of Kamann & Rother (CVPR 2020) and mmdet's test_robustness.py
# (docs/algorithms.md section 8): the 15 benchmark corruptions at severities 1-5,
# each applied to the image as loaded, before the test pipeline; mPC (the mean
# over corruptions and severities) and rPC (mPC / clean). Needs
# `pip install 'mmseg_robust[corruptions]'`.
#
# `tools/test.py CFG CKPT --cfg-options evaluator=Corruptions` uses this file
# (options: evaluator.corruptions=benchmark|all|noise|blur|weather|digital|
# holdout|<names>, evaluator.severities=[1,3], evaluator.seed=0); a config
# inherits it as configs/_base_/evaluators/sea.py shows.
robustness_test_cfg = dict(
    type='CorruptionTestLoop',
    corruptions='benchmark',
    severities=[1, 2, 3, 4, 5],
    seed=0,
    resume=True,
    log_interval=50,
)
robustness_evaluator = dict(type='CorruptionMetric')
