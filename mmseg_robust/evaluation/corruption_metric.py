"""The common-corruption metric: clean, per corruption and severity, per
category, mPC and rPC (docs/algorithms.md section 8).

:class:`~mmseg_robust.engine.CorruptionTestLoop` hands this metric, from every
rank, the counts of each pass summed over the rank's images (integers, so the
sums over ranks do not depend on how the images were split). Each pass is scored
as mmseg's ``IoUMetric`` scores a test set (pooled over pixels).

mPC and rPC are defined as in mmdet's ``robustness_eval.py`` (Michaelis et al.,
2019): mPC = the mean of the metric over the benchmark corruptions (the 15 of
:data:`~mmseg_robust.datasets.BENCHMARK_CORRUPTIONS`, those evaluated) and the
evaluated severities; rPC = mPC / the clean metric. ``mPC_all``/``rPC_all``
average over every evaluated corruption, the held-out ones included (mmdet's
``aggregate='all'``).
"""

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger, print_log

from mmseg_robust.datasets.corruptions import (
    BENCHMARK_CORRUPTIONS,
    CATEGORIES,
    CORRUPTIONS,
    category_of,
)
from mmseg_robust.registry import METRICS

from .counts import RECORD_COUNT_KEYS, pooled_metrics
from .results import RobustnessResults, write_results

__all__ = [
    'CorruptionMetric',
    'flatten_corruption_summary',
    'format_corruption_summary',
    'summarize_corruptions',
]

_METRICS = ('mIoU', 'aAcc', 'mAcc')


def _score(counts: dict) -> dict:
    """mIoU, aAcc, mAcc (percent) of a pass's pooled counts."""
    pooled = pooled_metrics([{k: counts[k] for k in RECORD_COUNT_KEYS}])
    return OrderedDict((m, 100.0 * float(pooled[m])) for m in _METRICS)


def _mean(scores: List[dict]) -> dict:
    return OrderedDict((m, sum(s[m] for s in scores) / len(scores)) for m in _METRICS)


def _relative(mpc: dict, clean: dict) -> dict:
    """rPC in percent: mPC / clean x 100."""
    return OrderedDict(
        (m, 100.0 * mpc[m] / clean[m] if clean[m] else float('nan')) for m in _METRICS
    )


def sum_counts(parts: Sequence[Dict[str, dict]]) -> Dict[str, dict]:
    """The pass-wise sums of several ranks' pooled counts (``{pass: counts}``)."""
    total: Dict[str, dict] = OrderedDict()
    for part in parts:
        for name, c in part.items():
            if name not in total:
                total[name] = {
                    k: list(v) if isinstance(v, list) else v for k, v in c.items()
                }
                continue
            t = total[name]
            for k in RECORD_COUNT_KEYS:
                t[k] = [a + b for a, b in zip(t[k], c[k])]
            for k in ('correct', 'valid', 'images'):
                t[k] += c[k]
    return total


def summarize_corruptions(
    counts: Dict[str, dict],
    corruptions: Sequence[str],
    severities: Sequence[int],
) -> dict:
    """All numbers of a corruption evaluation, in percent.

    Args:
        counts (dict): ``{'clean': pooled counts, '<corruption>/<severity>':
            pooled counts}`` (``intersect``, ``union``, ``label_area`` per
            class, ``correct``, ``valid``, ``images``).
        corruptions (sequence of str): the evaluated corruptions.
        severities (sequence of int): the evaluated severities.

    Returns:
        dict: ``{'num_images', 'clean': {mIoU, aAcc, mAcc}, 'eps': {},
        'corruptions': {'severities', 'per_corruption': {name: {'category',
        'severity': {'1': {mIoU, aAcc, mAcc}, ...}, 'mean'}}, 'per_category':
        {category: {mIoU, aAcc, mAcc, 'corruptions'}}, 'mPC', 'rPC' (over the
        evaluated benchmark corruptions; None without one), 'mPC_all',
        'rPC_all' (over all evaluated), 'mPC_corruptions', 'counts'}}``.
    """
    clean = _score(counts['clean'])
    per_corruption = OrderedDict()
    for name in [c for c in CORRUPTIONS if c in corruptions]:
        per_severity = OrderedDict(
            (str(s), _score(counts[f'{name}/{s}'])) for s in severities
        )
        per_corruption[name] = OrderedDict(
            category=category_of(name),
            severity=per_severity,
            mean=_mean(list(per_severity.values())),
        )
    per_category = OrderedDict()
    for category, names in CATEGORIES.items():
        evaluated = [n for n in names if n in per_corruption]
        if evaluated:
            scores = [
                s for n in evaluated for s in per_corruption[n]['severity'].values()
            ]
            per_category[category] = OrderedDict(_mean(scores), corruptions=evaluated)
    bench = [n for n in per_corruption if n in BENCHMARK_CORRUPTIONS]

    def mean_over(names):
        return _mean([s for n in names for s in per_corruption[n]['severity'].values()])

    mpc = mean_over(bench) if bench else None
    mpc_all = mean_over(list(per_corruption)) if per_corruption else None
    return OrderedDict(
        num_images=int(counts['clean']['images']),
        clean=clean,
        eps=OrderedDict(),
        corruptions=OrderedDict(
            severities=[int(s) for s in severities],
            per_corruption=per_corruption,
            per_category=per_category,
            mPC=mpc,
            rPC=_relative(mpc, clean) if mpc else None,
            mPC_corruptions=bench,
            mPC_all=mpc_all,
            rPC_all=_relative(mpc_all, clean) if mpc_all else None,
            counts=counts,
        ),
    )


def flatten_corruption_summary(summary: dict) -> Dict[str, float]:
    """Flat ``{key: percent}`` metrics for logging (2 decimals): clean
    ``mIoU``/``aAcc``/``mAcc``; ``corruptions/mPC/mIoU``, ``.../rPC/mIoU``
    (and aAcc, mAcc); ``corruptions/<category>/mIoU``;
    ``corruptions/<corruption>/mIoU`` (mean over the severities)."""
    flat = OrderedDict((k, round(v, 2)) for k, v in summary['clean'].items())
    corr = summary['corruptions']
    for key in ('mPC', 'rPC', 'mPC_all', 'rPC_all'):
        if corr.get(key):
            for m in _METRICS:
                flat[f'corruptions/{key}/{m}'] = round(corr[key][m], 2)
    for category, res in corr['per_category'].items():
        flat[f'corruptions/{category}/mIoU'] = round(res['mIoU'], 2)
    for name, res in corr['per_corruption'].items():
        flat[f'corruptions/{name}/mIoU'] = round(res['mean']['mIoU'], 2)
    return flat


def format_corruption_summary(summary: dict) -> str:
    """A plain-text table: mIoU (aAcc) per corruption and severity, the mean,
    then the categories, mPC and rPC."""
    corr = summary['corruptions']
    sev = [str(s) for s in corr['severities']]
    rows = [['corruption', 'category'] + [f'sev {s}' for s in sev] + ['mean']]

    def cell(r):
        return f'{r["mIoU"]:.2f} ({r["aAcc"]:.2f})'

    c = summary['clean']
    rows.append(['clean', '-'] + [''] * len(sev) + [cell(c)])
    for name, res in corr['per_corruption'].items():
        rows.append(
            [name, res['category']]
            + [cell(res['severity'][s]) for s in sev]
            + [cell(res['mean'])]
        )
    for category, res in corr['per_category'].items():
        rows.append([f'{category} (mean)', category] + [''] * len(sev) + [cell(res)])
    for key in ('mPC', 'mPC_all'):
        if corr.get(key):
            rows.append([key, '-'] + [''] * len(sev) + [cell(corr[key])])
    for key in ('rPC', 'rPC_all'):
        if corr.get(key):
            r = corr[key]
            rows.append(
                [f'{key} (%)', '-']
                + [''] * len(sev)
                + [f'{r["mIoU"]:.1f} ({r["aAcc"]:.1f})']
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [' | '.join(x.ljust(w) for x, w in zip(row, widths)) for row in rows]
    lines.insert(1, '-+-'.join('-' * w for w in widths))
    return 'mIoU (aAcc), percent\n' + '\n'.join(lines)


@METRICS.register_module()
class CorruptionMetric(BaseMetric):
    """Clean and corrupted mIoU/aAcc/mAcc, per category, mPC and rPC, from the
    pooled counts of :class:`~mmseg_robust.engine.CorruptionTestLoop`.

    Writes the results file ``robustness_<timestamp>.json``
    (:mod:`mmseg_robust.evaluation.results`; the corruption numbers under
    ``summary['corruptions']``) to ``output_dir`` or the work dir.

    Args:
        collect_device (str): ``'cpu'`` or ``'gpu'``. Default: ``'cpu'``.
        prefix (str, optional): metric prefix. Default: none.
        output_dir (str, optional): where to write the results file;
            ``tools/test.py --out DIR`` sets it. Default: the work dir.
    """

    default_prefix = ''

    def __init__(
        self,
        collect_device: str = 'cpu',
        prefix: Optional[str] = None,
        output_dir: Optional[str] = None,
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.output_dir = output_dir
        self.summary: Optional[dict] = None
        self.results_path: Optional[str] = None
        self._run_info: dict = {}

    def set_run_info(self, work_dir: Optional[str] = None, **info) -> None:
        """What the results file records about the run, given by the loop:
        ``work_dir``, ``corruptions``, ``severities``, ``seed``,
        ``checkpoint``, ``timestamp``, ``libraries``."""
        self._run_info = dict(info, work_dir=work_dir)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            counts = (
                sample.get('corruption_counts') if isinstance(sample, dict) else None
            )
            if counts is None:
                raise ValueError(
                    'CorruptionMetric needs the pooled counts of '
                    "CorruptionTestLoop: set test_cfg=dict(type='CorruptionTestLoop') "
                    '(or use --cfg-options evaluator=Corruptions with tools/test.py)'
                )
            self.results.append(counts)

    def compute_metrics(self, results: list) -> Dict[str, float]:
        info = self._run_info
        counts = sum_counts(results)
        corruptions = info.get('corruptions') or sorted(
            {k.split('/')[0] for k in counts if k != 'clean'}
        )
        severities = info.get('severities') or sorted(
            {int(k.split('/')[1]) for k in counts if k != 'clean'}
        )
        self.summary = summarize_corruptions(counts, corruptions, severities)
        logger = MMLogger.get_current_instance()
        print_log('\n' + format_corruption_summary(self.summary), logger=logger)
        metrics = flatten_corruption_summary(self.summary)
        folder = self.output_dir or info.get('work_dir')
        if folder:
            self.results_path = write_results(
                RobustnessResults(
                    summary=self.summary,
                    metrics=metrics,
                    worst_case_modes=[],
                    seed=int(info.get('seed') or 0),
                    checkpoint=info.get('checkpoint'),
                    timestamp=info.get('timestamp'),
                    corruptions=dict(
                        names=list(corruptions),
                        severities=list(severities),
                        seed=int(info.get('seed') or 0),
                        libraries=info.get('libraries') or {},
                    ),
                ),
                folder,
            )
            print_log(
                f'Corruption results written to {self.results_path}', logger=logger
            )
        return metrics
