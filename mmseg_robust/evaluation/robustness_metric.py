"""The robustness metric: clean, per-attack and SEA worst-case numbers from
per-image counts (docs/algorithms.md section 4).

:class:`~mmseg_robust.engine.AdversarialTestLoop` hands this metric one record per
image with per-class intersection/union/label-area counts and the pixel accuracy of
the clean prediction and of every attack at every eps (see
:func:`image_record`); never a prediction map. mmengine gathers the records from
all ranks in dataset order, so the numbers do not depend on the number of
processes.
"""

import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
from mmengine.dist import all_gather_object, get_world_size
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger, print_log

from mmseg_robust.registry import METRICS

from .counts import (  # noqa: F401 - the records' helpers, importable from here
    RECORD_COUNT_KEYS,
    counts_of_batch,
    eps_key,
    image_record,
    pixel_accuracy,
    pooled_metrics,
)
from .results import RobustnessResults, write_results
from .self_checks import Flag, above_clean_counts, final_checks, merge_flags
from .worst_case import WORST_CASE_MIOU_MODES, worst_case_aacc, worst_case_miou

__all__ = [
    'RobustnessMetric',
    'counts_of_batch',
    'eps_key',
    'flatten_summary',
    'format_above_clean',
    'format_summary',
    'image_record',
    'summarize_records',
]


def _counts(records: Sequence[dict], getter) -> List[dict]:
    return [getter(r) for r in records]


def _pooled(records, getter) -> dict:
    """mIoU and pooled aAcc (percent) of one prediction per image."""
    pooled = pooled_metrics(_counts(records, getter))
    return dict(mIoU=_percent(pooled['mIoU']), aAcc=_percent(pooled['aAcc']))


def _image_accuracies(records, getter, keep: np.ndarray) -> np.ndarray:
    """Per-image pixel accuracy (fractions) of the images in ``keep``."""
    counts = _counts(records, getter)
    return pixel_accuracy([c['correct'] for c in counts], [c['valid'] for c in counts])[
        keep
    ]


def _percent(value: float) -> float:
    return 100.0 * float(value)


def _mean_percent(acc: np.ndarray) -> float:
    return _percent(acc.mean()) if acc.size else float('nan')


def summarize_records(
    records: Sequence[dict],
    worst_case_modes: Sequence[str] = WORST_CASE_MIOU_MODES,
    seed: int = 0,
    clean_candidate: bool = False,
) -> dict:
    """All numbers of a robustness evaluation, in percent.

    Args:
        records (sequence of dict): :func:`image_record` outputs, in dataset order.
        worst_case_modes (sequence of str): greedy modes of the worst-case mIoU to
            report (``'best'``, ``'reference'``).
        seed (int): seed of the greedy's image order.
        clean_candidate (bool): count the clean image (it is in the eps-ball)
            as one more candidate of the worst case: in ``aAcc_img`` and in the
            ``'best'`` greedy's mIoU; the ``'reference'`` greedy keeps the SEA
            reference's candidates, the attacks only (docs/algorithms.md
            section 4). Default: False (the attacks only, as SEA).

    Returns:
        dict: ``{'num_images', 'clean': {mIoU, aAcc, aAcc_img}, 'eps': {eps:
        {'attacks': {name: {mIoU, aAcc, aAcc_img}}, 'budget': {name: {passes,
        forwards, passes_max, forwards_max}}, 'worst_case': {aAcc_img,
        mIoU (first mode), mIoU_<mode> ..., clean_candidate}, 'above_clean':
        {images, attacks: {name: n}, worst_case, worst_case_images}}}}``.
        ``aAcc`` is pooled over pixels (mmseg's), ``aAcc_img`` the mean over
        images of each image's accuracy (SEA's aACC); images without valid
        pixels are left out of ``aAcc_img``. ``above_clean`` counts the images
        ending above their clean pixel accuracy under each attack and under
        the worst case over the attacks (information; the flag
        ``robust_above_clean`` is raised from it, docs/flags.md).
    """
    if not records:
        raise ValueError('no image records to summarize')
    keep = np.asarray([r['clean']['valid'] > 0 for r in records])
    clean = _pooled(records, lambda r: r['clean'])
    clean_acc = _image_accuracies(records, lambda r: r['clean'], keep)
    clean['aAcc_img'] = _mean_percent(clean_acc)
    out = OrderedDict(num_images=len(records), clean=clean, eps=OrderedDict())
    above = above_clean_counts(records)
    for eps in records[0]['attacks']:
        names = list(records[0]['attacks'][eps])
        per_attack = OrderedDict()
        accs = []
        for name in names:

            def get(r, eps=eps, name=name):
                return r['attacks'][eps][name]

            res = _pooled(records, get)
            acc = _image_accuracies(records, get, keep)
            res['aAcc_img'] = _mean_percent(acc)
            per_attack[name] = res
            accs.append(acc)
        inter, union = (
            np.stack(
                [
                    np.asarray([r['attacks'][eps][n][key] for r in records], np.int64)
                    for n in names
                ]
            )
            for key in ('intersect', 'union')
        )
        if clean_candidate:
            # the clean image is in the ball: one more candidate (section 4)
            accs.append(clean_acc)
            clean_inter, clean_union = (
                np.asarray([r['clean'][key] for r in records], np.int64)[None]
                for key in ('intersect', 'union')
            )
        worst = OrderedDict(
            aAcc_img=_percent(worst_case_aacc(np.stack(accs)))
            if keep.any()
            else float('nan')
        )
        for i, mode in enumerate(worst_case_modes):
            inter_m, union_m = inter, union
            if clean_candidate and mode == 'best':
                inter_m = np.concatenate([inter, clean_inter])
                union_m = np.concatenate([union, clean_union])
            miou, _ = worst_case_miou(inter_m, union_m, mode=mode, seed=seed)
            worst[f'mIoU_{mode}'] = _percent(miou)
            if i == 0:
                worst['mIoU'] = _percent(miou)
                worst['mIoU_mode'] = mode  # which greedy ``mIoU`` is
        worst['clean_candidate'] = bool(clean_candidate)
        out['eps'][eps] = OrderedDict(
            attacks=per_attack,
            budget=_budget(records, eps, names),
            worst_case=worst,
            above_clean=above.get(
                eps,
                dict(
                    images=0,
                    attacks={n: 0 for n in names},
                    worst_case=0,
                    worst_case_images=[],
                ),
            ),
        )
    return out


def _budget(records: Sequence[dict], eps: str, names: Sequence[str]) -> dict:
    """Per attack the passes it spent per image (docs/algorithms.md section 3.6):
    ``{name: {'passes', 'forwards', 'passes_max', 'forwards_max'}}``, the mean
    and the maximum over images of the forward+backward and the forward-only
    passes; an attack whose records do not all carry them (records written
    before the pass accounting) is left out."""
    out = OrderedDict()
    for name in names:
        counts = [r['attacks'][eps][name] for r in records]
        if not all(
            c.get(k) is not None for c in counts for k in ('passes', 'forwards')
        ):
            continue
        entry = OrderedDict()
        for key in ('passes', 'forwards'):
            values = np.asarray([c[key] for c in counts], dtype=np.float64)
            entry[key] = float(values.mean())
            entry[f'{key}_max'] = int(values.max())
        out[name] = entry
    return out


def flatten_summary(summary: dict, name: str = 'SEA') -> Dict[str, float]:
    """Flat ``{key: percent}`` metrics for logging (2 decimals).

    Keys: ``mIoU``, ``aAcc``, ``aAcc_img`` (clean), ``eps8/<name>/mIoU``,
    ``eps8/<name>/aAcc`` (worst case over the attacks), ``eps8/<name>/mIoU_<mode>``
    and ``eps8/<attack>/mIoU``, ``eps8/<attack>/aAcc`` per single attack.
    """
    flat = OrderedDict()
    for k, v in summary['clean'].items():
        flat[k] = round(v, 2)
    for eps, res in summary['eps'].items():
        worst = res['worst_case']
        flat[f'eps{eps}/{name}/mIoU'] = round(worst['mIoU'], 2)
        flat[f'eps{eps}/{name}/aAcc'] = round(worst['aAcc_img'], 2)
        for mode in _modes(worst):
            flat[f'eps{eps}/{name}/mIoU_{mode}'] = round(worst[f'mIoU_{mode}'], 2)
        for attack, r in res['attacks'].items():
            flat[f'eps{eps}/{attack}/mIoU'] = round(r['mIoU'], 2)
            flat[f'eps{eps}/{attack}/aAcc'] = round(r['aAcc_img'], 2)
    return flat


def _modes(worst: dict) -> List[str]:
    """The greedy modes of a worst-case entry (``mIoU_<mode>`` keys)."""
    return [
        k[len('mIoU_') :] for k in worst if k.startswith('mIoU_') and k != 'mIoU_mode'
    ]


def format_summary(summary: dict, name: str = 'SEA') -> str:
    """A plain-text table of a summary (percent)."""
    rows = [('eps', 'attack', 'mIoU', 'aAcc (pooled)', 'aAcc (per image)')]
    c = summary['clean']
    rows.append(
        ('0', 'clean', f'{c["mIoU"]:.2f}', f'{c["aAcc"]:.2f}', f'{c["aAcc_img"]:.2f}')
    )
    for eps, res in summary['eps'].items():
        for attack, r in res['attacks'].items():
            rows.append(
                (
                    eps,
                    attack,
                    f'{r["mIoU"]:.2f}',
                    f'{r["aAcc"]:.2f}',
                    f'{r["aAcc_img"]:.2f}',
                )
            )
        w = res['worst_case']
        rows.append(
            (
                eps,
                f'{name} (worst case'
                + (' with the clean image' if w.get('clean_candidate') else '')
                + f', {w.get("mIoU_mode", "best")} greedy)',
                f'{w["mIoU"]:.2f}',
                '-',
                f'{w["aAcc_img"]:.2f}',
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [' | '.join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, '-+-'.join('-' * w for w in widths))
    return '\n'.join(lines)


def format_above_clean(summary: dict) -> str:
    """One information line on the images that single attacks left above
    their clean pixel accuracy (``summary['eps'][eps]['above_clean']``), or
    ``''`` when there is none. Not a flag: a random start in the eps-ball can
    end above clean on a robust image; ``robust_above_clean`` (docs/flags.md)
    is raised when the worst case does."""
    parts = []
    for eps, res in summary['eps'].items():
        v = res.get('above_clean') or {}
        counts = {n: k for n, k in (v.get('attacks') or {}).items() if k}
        if counts:
            names = ', '.join(f'{n} {k}' for n, k in counts.items())
            parts.append(
                f'eps {eps}: {names} of {v["images"]} images; worst case '
                f'{v["worst_case"]}'
            )
    if not parts:
        return ''
    return (
        'Images ending above their clean pixel accuracy (information, not a '
        'flag; docs/flags.md#robust_above_clean): ' + '; '.join(parts)
    )


@METRICS.register_module()
class RobustnessMetric(BaseMetric):
    """Clean, per-attack and worst-case (SEA) mIoU/aACC from per-image counts.

    Used with :class:`~mmseg_robust.engine.AdversarialTestLoop`, whose outputs
    carry one record per image (:func:`image_record`: per-class
    intersection/union/label-area counts of the clean prediction and of every
    attack at every eps); ``compute_metrics`` gets every record in dataset order.
    The metric owns the numbers and the results file
    (:mod:`mmseg_robust.evaluation.results`, all in percent).

    Reported (percent, like mmseg): clean ``mIoU``/``aAcc`` (pooled, as
    ``IoUMetric``) and ``aAcc_img`` (mean per-image accuracy); per eps the worst
    case over the attacks, ``eps8/SEA/mIoU`` (greedy worst-case mIoU, first mode of
    ``worst_case_modes``), ``eps8/SEA/mIoU_<mode>`` for each mode and
    ``eps8/SEA/aAcc`` (mean over images of the minimum accuracy over attacks,
    docs/algorithms.md section 4), and each single attack's ``eps8/<attack>/mIoU``
    (pooled) and ``eps8/<attack>/aAcc`` (mean per-image).

    Args:
        worst_case_modes (sequence of str): ``'best'`` (default first: never
            weaker per swap) and/or ``'reference'`` (the SEA reference's greedy,
            for comparison with published numbers).
        seed (int): seed of the greedy's image order. Default: 0.
        name (str): name of the worst case in the keys. Default: ``'SEA'``.
        collect_device (str): ``'cpu'`` or ``'gpu'``. Default: ``'cpu'``.
        prefix (str, optional): metric prefix. Default: none (mmseg's metric
            names).
        output_dir (str, optional): where to write the results file
            ``robustness_<timestamp>.json``; ``tools/test.py --out DIR`` sets it
            (mmseg's ``IoUMetric`` writes its predictions there). Default: the
            work dir the test loop gives (:meth:`set_run_info`); nothing is
            written without either (e.g. in a validation loop).
        keep_results (bool): add every image's record (per-class counts per
            attack) to the results file. Default: False.
        clean_candidate (bool): count the clean image as a candidate of the
            worst case (it is in the eps-ball): in ``aAcc`` and the ``'best'``
            greedy's mIoU; the ``'reference'`` greedy is unchanged
            (docs/algorithms.md section 4). Default: False (the attacks only,
            as SEA).

    Self-checks (docs/flags.md): the test loop's outputs carry the flags found
    on each batch (``robustness_flags``, None with the checks off); at the end
    the metric adds ``clean_near_chance`` and ``robust_above_clean`` (unless
    the checks were off) and writes every flag, gathered from all ranks, to the
    results file's ``flags`` (also :attr:`flags`).
    """

    default_prefix = ''  # mmseg's metric names, without the "prefix" warning

    def __init__(
        self,
        worst_case_modes: Sequence[str] = ('best', 'reference'),
        seed: int = 0,
        name: str = 'SEA',
        collect_device: str = 'cpu',
        prefix: Optional[str] = None,
        output_dir: Optional[str] = None,
        keep_results: bool = False,
        clean_candidate: bool = False,
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.output_dir = output_dir
        self.keep_results = keep_results
        self.clean_candidate = bool(clean_candidate)
        modes = (
            [worst_case_modes]
            if isinstance(worst_case_modes, str)
            else list(worst_case_modes)
        )
        unknown = [m for m in modes if m not in WORST_CASE_MIOU_MODES]
        if unknown or not modes:
            raise ValueError(
                f'worst_case_modes must be a non-empty subset of '
                f'{WORST_CASE_MIOU_MODES}, got {modes}'
            )
        self.worst_case_modes = modes
        self.seed = seed
        self.name = name
        self.summary: Optional[dict] = None
        self.results_path: Optional[str] = None
        self._run_info: dict = {}
        self.self_checks = True
        self.flags: List[Flag] = []
        self._batch_flags: List[Flag] = []
        self._checked: Optional[bool] = None

    def set_run_info(self, work_dir: Optional[str] = None, **info) -> None:
        """What the results file records about the run, given by the test loop:
        ``work_dir`` (default folder of the file), ``attacks``, ``eps``,
        ``checkpoint``, ``timestamp``."""
        self._run_info = dict(info, work_dir=work_dir)

    def evaluate(self, size: int) -> dict:
        # the flags of this evaluation's batches, from every rank
        flags, checked = self._batch_flags, self._checked
        if get_world_size() > 1:
            gathered = all_gather_object((list(flags), checked))
            flags = merge_flags(*(f for f, _ in gathered))
            known = [c for _, c in gathered if c is not None]
            checked = any(known) if known else None
        self.flags = list(flags)
        self.self_checks = True if checked is None else checked
        self._batch_flags, self._checked = [], None
        return super().evaluate(size)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            record = sample.get('robustness') if isinstance(sample, dict) else None
            if record is None:
                raise ValueError(
                    'RobustnessMetric needs the per-image counts computed by '
                    'AdversarialTestLoop: set test_cfg=dict(type='
                    "'AdversarialTestLoop', attacks=[...]) (or use "
                    '--cfg-options evaluator=SEA with tools/test.py).'
                )
            self.results.append(record)
            # the self-checks' flags of the batch (None: the checks were off)
            flags = sample.get('robustness_flags')
            self._checked = bool(self._checked) or flags is not None
            if flags:
                self._batch_flags = merge_flags(
                    self._batch_flags, [f for f in flags if f]
                )

    def compute_metrics(self, results: list) -> Dict[str, float]:
        self.summary = summarize_records(
            results, self.worst_case_modes, self.seed, self.clean_candidate
        )
        print_log(
            '\n' + format_summary(self.summary, self.name),
            logger=MMLogger.get_current_instance(),
        )
        above = format_above_clean(self.summary)
        if above:
            print_log(above, logger=MMLogger.get_current_instance())
        metrics = flatten_summary(self.summary, self.name)
        if self.self_checks:
            end = final_checks(results, self.summary)
            for flag in end:
                print_log(
                    flag.text(),
                    logger=MMLogger.get_current_instance(),
                    level=logging.WARNING,
                )
            self.flags = merge_flags(self.flags, end)
        folder = self.output_dir or self._run_info.get('work_dir')
        if folder:
            info = self._run_info
            self.results_path = write_results(
                RobustnessResults(
                    summary=self.summary,
                    metrics=metrics,
                    worst_case_modes=self.worst_case_modes,
                    seed=self.seed,
                    attacks=info.get('attacks', []),
                    eps=info.get('eps', []),
                    checkpoint=info.get('checkpoint'),
                    timestamp=info.get('timestamp'),
                    images=results if self.keep_results else None,
                    flags=[f.to_json() for f in self.flags]
                    if self.self_checks
                    else None,
                ),
                folder,
            )
            print_log(
                f'Robustness results written to {self.results_path}',
                logger=MMLogger.get_current_instance(),
            )
        return metrics
