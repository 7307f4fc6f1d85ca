# SegPGD (Gu et al., ECCV 2022): PGD with the SegPGD loss, 100 steps
# (docs/algorithms.md sections 2, 3.1), at L-inf eps 4/255 and 8/255. Used by
# `tools/test.py CFG CKPT --cfg-options evaluator=SegPGD`; inherit it as
# configs/_base_/evaluators/sea.py shows.
robustness_test_cfg = dict(
    type='AdversarialTestLoop',
    attacks=[dict(type='PGD', steps=100, loss='SegPGD', best_iterate=True)],
    eps=[4, 8],
    seed=0,
    resume=True,
    log_interval=1,
)
robustness_evaluator = dict(
    type='RobustnessMetric',
    name='SegPGD',
    seed=0,
    worst_case_modes=['best', 'reference'],
)
