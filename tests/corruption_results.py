"""Corruption results files built from constructed pooled counts, written by
:class:`~mmseg_robust.evaluation.CorruptionMetric` itself (for the report and
demo tests, which need files of known content without running the loop)."""

import numpy as np


def pass_counts(rng, quality, num_classes=5, images=6):
    """Pooled counts of one pass whose IoUs scale with ``quality`` in (0, 1]."""
    label = rng.integers(200, 2000, num_classes)
    inter = np.floor(label * quality * rng.uniform(0.8, 1.0, num_classes)).astype(int)
    # pred_area = intersect + wrongly predicted pixels; union = pred + label - inter
    union = label + rng.integers(0, 300, num_classes)
    return dict(
        intersect=inter.tolist(),
        union=union.tolist(),
        label_area=label.tolist(),
        correct=int(inter.sum()),
        valid=int(label.sum()),
        images=images,
    )


def write_corruption_results(
    folder,
    corruptions,
    severities,
    checkpoint=None,
    seed=0,
    quality=0.9,
    timestamp='20261206_120000',
    images=6,
):
    """Write a corruption results file of constructed counts (each corruption
    a little worse than the previous one, each severity worse than the last)
    through CorruptionMetric; return ``(path, summary)``."""
    from mmseg_robust.evaluation import CorruptionMetric

    rng = np.random.default_rng(seed)
    counts = {'clean': pass_counts(rng, quality, images=images)}
    for i, name in enumerate(corruptions):
        for s in severities:
            q = quality * (1 - 0.12 * s) * (1 - 0.03 * i)
            counts[f'{name}/{s}'] = pass_counts(rng, q, images=images)
    metric = CorruptionMetric(output_dir=str(folder))
    metric.set_run_info(
        corruptions=list(corruptions),
        severities=list(severities),
        seed=seed,
        checkpoint=checkpoint,
        timestamp=timestamp,
        libraries={},
    )
    metric.process(None, [dict(corruption_counts=counts)])
    metric.compute_metrics(metric.results)
    return metric.results_path, metric.summary
