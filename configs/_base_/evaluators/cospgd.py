# CosPGD (Agnihotri & Keuper, ICML 2024): PGD with the CosPGD loss, 100 steps
# (docs/algorithms.md sections 2, 3.1), at L-inf eps 4/255 and 8/255. Used by
# `tools/test.py CFG CKPT --cfg-options evaluator=CosPGD`; inherit it as
# configs/_base_/evaluators/sea.py shows.
robustness_test_cfg = dict(
    type='AdversarialTestLoop',
    attacks=[dict(type='PGD', steps=100, loss='CosPGD', best_iterate=True)],
    eps=[4, 8],
    seed=0,
    resume=True,
    log_interval=1,
)
robustness_evaluator = dict(
    type='RobustnessMetric',
    name='CosPGD',
    seed=0,
    worst_case_modes=['best', 'reference'],
)
