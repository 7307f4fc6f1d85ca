"""The results file of a robustness evaluation: one schema, one writer, one reader.

:class:`~mmseg_robust.evaluation.RobustnessMetric` writes it (``work_dir`` or
``tools/test.py --out DIR``) as ``robustness_<timestamp>.json`` (never over
another run's file: ``robustness_<timestamp>_2.json`` when that name is taken);
the report (:func:`mmseg_robust.reporting.load_result`) and everything else read
it back through :func:`load_results`. Every number in it is a percentage.

Schema (version 3)::

    {
      "schema_version": 3,
      "unit": "percent",
      "metrics": {"mIoU": .., "aAcc": .., "aAcc_img": ..,
                  "eps8/SEA/mIoU": .., "eps8/SEA/aAcc": ..,
                  "eps8/SEA/mIoU_best": .., "eps8/APGD-Mask-CE/mIoU": .., ...},
      "summary": {"num_images": N,
                  "clean": {"mIoU", "aAcc", "aAcc_img"},
                  "eps": {"8": {"attacks": {name: {"mIoU", "aAcc", "aAcc_img"}},
                                "budget": {name: {"passes", "forwards",
                                                  "passes_max", "forwards_max"}},
                                "worst_case": {"aAcc_img", "mIoU",
                                               "mIoU_<mode>", ...,
                                               "clean_candidate"},
                                "above_clean": {"images", "attacks",
                                                "worst_case", ...}}}},
      "worst_case_modes": ["best", "reference"],   # "mIoU" is the first one's
      "attacks": [attack configs], "eps": [radii in /255], "seed": 0,
      "checkpoint": "path", "timestamp": "...",
      "flags": [{"code", "level", "message", "fix", "details"}],  # self-checks
      "images": [per-image records]                 # only with --out / keep_results
    }

A corruption evaluation (:class:`~mmseg_robust.evaluation.CorruptionMetric`)
writes the same file with ``eps`` empty, ``flags`` None and two more fields:
``summary["corruptions"]`` (per corruption and severity, per category, ``mPC``,
``rPC``, the pooled counts of every pass:
:func:`~mmseg_robust.evaluation.summarize_corruptions`) and ``corruptions``
(``{"names", "severities", "seed", "libraries"}``: what was run, with the
versions of the libraries the corrupted images depend on).

``budget`` gives per attack the forward+backward passes (``passes``) and the
forward-only passes (``forwards``) it spent per image, mean and maximum over
images (counts, not percentages; docs/algorithms.md section 3.6); the per-image
records carry them as ``passes`` and ``forwards`` next to each attack's counts.
Files written before the pass accounting have neither and stay readable.

``metrics`` holds the numbers mmengine logs (the same as ``summary``, flat).
``aAcc`` is pooled over pixels (mmseg's), ``aAcc_img`` the mean over images of
each image's pixel accuracy (SEA's aACC). ``above_clean`` counts the images
ending above their clean pixel accuracy per attack and for the worst case
(information; docs/flags.md#robust_above_clean). ``flags`` are the findings of the
self-checks (docs/flags.md; empty: none raised). Files of schema version 2 were
written without self-checks (``flags`` None); files of schema version 1
(fractions, from development versions before 0.1.0) are refused.
"""

import json
import os
import os.path as osp
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Union

import numpy as np

__all__ = [
    'RobustnessResults',
    'SCHEMA_VERSION',
    'load_results',
    'results_filename',
    'write_results',
]

SCHEMA_VERSION = 3
UNIT = 'percent'


@dataclass
class RobustnessResults:
    """The content of a results file (see the module docstring)."""

    summary: Dict[str, Any]
    metrics: Dict[str, float]
    worst_case_modes: List[str]
    seed: int = 0
    attacks: List[dict] = field(default_factory=list)
    eps: List[float] = field(default_factory=list)
    checkpoint: Optional[str] = None
    timestamp: Optional[str] = None
    images: Optional[List[dict]] = None
    flags: Optional[List[dict]] = None  # None: written without self-checks
    # a corruption evaluation: {'names', 'severities', 'seed', 'libraries'}
    corruptions: Optional[Dict[str, Any]] = None
    schema_version: int = SCHEMA_VERSION
    unit: str = UNIT

    def to_json(self) -> dict:
        out = asdict(self)
        for key in ('images', 'corruptions'):
            if out[key] is None:
                del out[key]
        return out


def results_filename(timestamp: Optional[str], number: int = 1) -> str:
    """``robustness_<timestamp>.json`` (``robustness.json`` without one); the
    ``number``-th file of that name in a folder (``number`` >= 2) is
    ``robustness_<timestamp>_<number>.json``."""
    stem = f'robustness_{timestamp}' if timestamp else 'robustness'
    return f'{stem}.json' if number <= 1 else f'{stem}_{number}.json'


def write_results(results: RobustnessResults, folder: str) -> str:
    """Write ``results`` to a new file ``folder/robustness_<timestamp>.json``
    and return its path. Never overwrites: when that name exists (another run
    started in the same second into the same folder), the file is
    ``robustness_<timestamp>_2.json``, ``_3`` ... (created exclusively, so two
    processes writing at once get two files)."""
    os.makedirs(folder, exist_ok=True)
    number = 1
    while True:
        path = osp.join(folder, results_filename(results.timestamp, number))
        try:
            f = open(path, 'x')
        except FileExistsError:
            number += 1
            continue
        with f:
            json.dump(results.to_json(), f, indent=1, default=_json_default)
        return path


def load_results(source: Union[str, os.PathLike, dict]) -> RobustnessResults:
    """Read a results file (or its loaded JSON content).

    Raises:
        ValueError: naming the file and what is wrong, e.g. for the JSON of a
            clean ``tools/test.py`` run (no ``summary``).
    """
    if isinstance(source, dict):
        data, where = source, 'robustness result (dict)'
    elif isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        with open(where, encoding='utf-8') as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f'{where} is not valid JSON ({e}); pass a '
                    'robustness_<timestamp>.json file.'
                ) from None
        if not isinstance(data, dict):
            raise ValueError(
                f'{where} does not hold a JSON object; pass a '
                'robustness_<timestamp>.json file.'
            )
    else:
        raise ValueError(
            'expected a path to a robustness JSON or its loaded '
            f'dict, got {type(source).__name__}.'
        )
    summary = data.get('summary')
    if not isinstance(summary, dict) or 'clean' not in summary:
        raise ValueError(
            f'{where} has no robustness summary (no "summary" with clean/eps '
            'results): it is not the output of a robustness evaluation. Run '
            'tools/test.py CFG CKPT --cfg-options evaluator=SEA and pass the '
            'robustness_<timestamp>.json it writes.'
        )
    if not isinstance(summary.get('eps') or {}, dict):
        raise ValueError(
            f'{where}: summary["eps"] should map eps keys to '
            f'results, got {type(summary["eps"]).__name__}.'
        )
    version = int(data.get('schema_version', 1))
    if version > SCHEMA_VERSION:
        raise ValueError(
            f'{where} has schema version {version}; this '
            f'mmseg_robust reads up to {SCHEMA_VERSION}: upgrade it'
        )
    if version < 2:
        raise ValueError(
            f'{where} has schema version 1 (fractions in [0, 1], written by a '
            'development version before 0.1.0), which this mmseg_robust does '
            'not read: evaluate again with tools/test.py (the result cache '
            'keeps what is still valid).'
        )
    return RobustnessResults(
        summary=summary,
        metrics=dict(data.get('metrics') or {}),
        worst_case_modes=list(data.get('worst_case_modes') or []),
        seed=int(data.get('seed') or 0),
        attacks=list(data.get('attacks') or []),
        eps=list(data.get('eps') or []),
        checkpoint=data.get('checkpoint'),
        timestamp=data.get('timestamp'),
        images=data.get('images'),
        flags=_flags_of(data, version),
        corruptions=data.get('corruptions'),
    )


def _flags_of(data: dict, version: int) -> Optional[List[dict]]:
    """The self-check flags (None: the file was written without self-checks,
    before schema version 3, or converted from such a file)."""
    flags = data.get('flags') if version >= 3 else None
    return None if flags is None else list(flags)


def _json_default(value):
    """numpy scalars and arrays in the records -> JSON numbers and lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f'cannot write {type(value).__name__} to JSON')
