# APGD (Croce & Hein, ICML 2020) with the cross-entropy, 100 iterations
# (docs/algorithms.md 3.2), at L-inf eps 4/255 and 8/255. Used by `tools/test.py CFG
# CKPT --cfg-options evaluator=APGD`; inherit it as configs/_base_/evaluators/sea.py
# shows.
robustness_test_cfg = dict(
    type='AdversarialTestLoop',
    attacks=[dict(type='APGD', steps=100, loss='CE')],
    eps=[4, 8],
    seed=0,
    resume=True,
    log_interval=1,
)
robustness_evaluator = dict(
    type='RobustnessMetric', name='APGD', seed=0, worst_case_modes=['best', 'reference']
)
