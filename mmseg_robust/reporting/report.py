"""Results tables, JSON/Markdown reports and robustness curves from the
``robustness_<timestamp>.json`` files written by the robustness evaluation
(adversarial: ``evaluator=SEA`` and the other attacks) and by the corruption
evaluation (``evaluator=Corruptions``).

A *row* (one evaluated model) is the plain dict returned by :func:`load_result`;
all its numbers are percentages. A row holds a model's adversarial results
(``eps``), its corruption results (``corruptions``) or both:
:func:`load_rows` reads several files and merges those of one model into one
row. Every function here needs only numpy, matplotlib
(without pyplot: the global backend is never touched) and the standard library.
"""

import json
import math
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmseg_robust.evaluation.results import load_results

__all__ = [
    'corruption_budget',
    'evaluation_budget',
    'format_corruption_details',
    'format_corruption_table',
    'format_flags',
    'format_overview_table',
    'format_table',
    'load_result',
    'load_rows',
    'merge_rows',
    'plot_corruption_heatmap',
    'plot_corruption_severity',
    'plot_robustness_curve',
    'shared_settings',
    'write_report',
]

_ROW_KEYS = ('name', 'clean', 'eps')
_TABLE_FORMATS = ('markdown', 'text')


def _pct(value, what: str, source: str) -> Optional[float]:
    """A percentage rounded to 2 decimals (None if NaN)."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f'{source}: {what} should be a number (percent), got {value!r}.'
        ) from None
    if not math.isfinite(value):
        return None
    return round(value, 2)


def _metric(res: dict, key: str, what: str, source: str) -> Optional[float]:
    if not isinstance(res, dict) or key not in res:
        raise ValueError(
            f'{source}: summary entry {what} has no {key!r}; expected '
            'the summary written by the robustness evaluation '
            '(tools/test.py ... --cfg-options evaluator=SEA).'
        )
    return _pct(res[key], f'{what}[{key!r}]', source)


def _eps_value(key: str, source: str) -> float:
    try:
        return float(key)
    except (TypeError, ValueError):
        raise ValueError(
            f'{source}: eps key {key!r} is not a number (keys are '
            "the radii in /255 units, e.g. '4', '8')."
        ) from None


def _default_name(checkpoint: Optional[str]) -> str:
    if checkpoint:
        parent = osp.basename(osp.dirname(str(checkpoint).rstrip('/\\')))
        if parent:
            return parent
    return 'model'


def load_result(
    source: Union[str, os.PathLike, dict], name: Optional[str] = None
) -> dict:
    """One model's row of a report from a robustness result JSON.

    The clean numbers are ``mIoU`` and ``aAcc_img`` of ``summary['clean']``; the
    robust numbers per eps are the worst case of the attack (SEA's, or that of the
    single attack evaluated): ``mIoU`` and ``aAcc_img`` of ``worst_case``. aACC is
    thus the mean over images of each image's pixel accuracy, clean and robust.

    Args:
        source (str | PathLike | dict): path to a ``robustness_<timestamp>.json``
            written by the robustness evaluation, or its already-loaded content.
        name (str, optional): model name of the row. Defaults to the name of the
            checkpoint's folder, or ``'model'`` without a checkpoint.

    Returns:
        dict: ``{'name', 'num_images', 'attack', 'steps', 'seed', 'checkpoint',
        'clean': {'mIoU', 'aAcc'}, 'eps': {eps: {'mIoU', 'aAcc'}}, 'flags'}``
        with the numbers in percent (2 decimals; None where the result is NaN)
        and the eps keys as strings (e.g. ``'4'``) in increasing numeric order;
        ``attack`` is the attack's type (its ``name`` if the config sets one),
        with several attacks the names of their results joined by ``' + '``
        (``'APGD-CE + APGD-JS-Avg'``), and ``steps`` is None when they differ;
        ``flags`` lists the self-checks' findings (``{'code', 'level',
        'message', 'fix'}``, docs/flags.md), None for files written without
        self-checks.

        A corruption results file (``evaluator=Corruptions``) gives a row with
        no adversarial results (``eps`` empty, ``attack``, ``steps`` and
        ``flags`` None, clean ``aAcc`` None: the file has the pooled aAcc
        only) and ``corruptions``: ``{'num_images', 'seed', 'checkpoint',
        'severities', 'names', 'clean', 'mPC', 'rPC', 'mPC_all', 'rPC_all',
        'mPC_corruptions', 'per_category': {category: {'mIoU', 'aAcc'}},
        'per_category_severity': {category: {severity: {'mIoU', 'aAcc'}}},
        'per_corruption': {name: {'category', 'severity': {severity: {'mIoU',
        'aAcc'}}, 'mean'}}}`` (severities as strings; aAcc pooled over
        pixels; ``rPC`` = mPC / clean in percent; ``mPC``/``rPC`` None without
        a benchmark corruption). An adversarial row has ``corruptions`` None
        until :func:`merge_rows` gives it its model's corruption results.

    Raises:
        ValueError: if the content is not a robustness result (e.g. the JSON of a
            clean ``tools/test.py`` run, which has no ``summary``).
    """
    where = (
        'robustness result (dict)'
        if isinstance(source, dict)
        else os.fspath(source)
        if isinstance(source, (str, os.PathLike))
        else None
    )
    results = load_results(source)
    summary = results.summary
    if summary.get('corruptions') is not None:
        return _corruption_row(results, name, where)
    eps_results = summary.get('eps') or {}
    attacks = [a for a in results.attacks or [] if isinstance(a, dict)]
    first = attacks[0] if attacks else {}
    attack = str(first.get('name', first.get('type', 'robust')))
    if len(attacks) > 1:
        # several attacks: the names their results are recorded under
        recorded = next(iter(eps_results.values()), {}).get('attacks') or {}
        attack = ' + '.join(recorded) or attack
    refine = first.get('refine_steps') if len(attacks) == 1 else None
    candidates = bool(first.get('miou_candidates')) and len(attacks) == 1
    if refine:
        # SEA with a refinement stage (docs/algorithms.md 4.1) is not the
        # paper's SEA: named apart, so the two are never compared unawares
        attack = f'{attack}+Refine'
    if candidates:
        # nor is SEA with its members' mIoU candidates (4.2)
        attack = f'{attack}+mIoU-iterates'
    all_steps = {a.get('steps', a.get('n_iter')) for a in attacks}
    steps = first.get('steps', first.get('n_iter')) if len(all_steps) == 1 else None
    steps = int(steps) if steps is not None else None
    seed = results.seed
    checkpoint = results.checkpoint
    num_images = summary.get('num_images')

    clean = summary['clean']
    row_eps = {}
    for key in sorted(eps_results, key=lambda k: _eps_value(k, where)):
        res = eps_results[key]
        worst = res.get('worst_case') if isinstance(res, dict) else None
        if worst is None:
            raise ValueError(
                f'{where}: summary["eps"][{key!r}] has no '
                '"worst_case" entry; expected the summary written by '
                'the robustness evaluation.'
            )
        what = f'summary["eps"][{key!r}]["worst_case"]'
        row_eps[str(key)] = {
            'mIoU': _metric(worst, 'mIoU', what, where),
            'aAcc': _metric(worst, 'aAcc_img', what, where),
        }
    return {
        'name': str(name) if name is not None else _default_name(checkpoint),
        'num_images': int(num_images) if num_images is not None else None,
        'attack': attack,
        'steps': steps,
        'refine_steps': int(refine) if refine else None,
        'miou_candidates': candidates,
        'seed': int(seed) if seed is not None else None,
        'checkpoint': str(checkpoint) if checkpoint is not None else None,
        'clean': {
            'mIoU': _metric(clean, 'mIoU', 'summary["clean"]', where),
            'aAcc': _metric(clean, 'aAcc_img', 'summary["clean"]', where),
        },
        'eps': row_eps,
        'flags': _row_flags(results.flags),
        'corruptions': None,
    }


def _corruption_row(results, name: Optional[str], where: str) -> dict:
    """The row of a corruption results file (:func:`load_result`)."""
    summary = results.summary
    corr = summary['corruptions']
    if not isinstance(corr, dict) or not isinstance(corr.get('per_corruption'), dict):
        raise ValueError(
            f'{where}: summary["corruptions"] has no "per_corruption" results; '
            'expected the summary written by the corruption evaluation '
            '(tools/test.py ... --cfg-options evaluator=Corruptions).'
        )
    if not corr['per_corruption']:
        raise ValueError(
            f'{where}: summary["corruptions"]["per_corruption"] is empty: the '
            'file holds no corrupted pass.'
        )
    severities = [str(s) for s in corr.get('severities') or []]
    if not severities:
        raise ValueError(
            f'{where}: summary["corruptions"] lists no "severities"; expected '
            'the summary written by the corruption evaluation.'
        )

    def pair(res, what):
        return {
            'mIoU': _metric(res, 'mIoU', what, where),
            'aAcc': _metric(res, 'aAcc', what, where),
        }

    per_corruption = {}
    for cname, res in corr['per_corruption'].items():
        what = f'summary["corruptions"]["per_corruption"][{cname!r}]'
        by_sev = res.get('severity') if isinstance(res, dict) else None
        missing = [s for s in severities if s not in (by_sev or {})]
        if missing:
            raise ValueError(
                f'{where}: {what} has no result at severity {", ".join(missing)} '
                f'(the file lists severities {", ".join(severities)}); the file '
                'is not the one the corruption evaluation wrote.'
            )
        per_corruption[str(cname)] = {
            'category': str(res.get('category', '')),
            'severity': {
                s: pair(by_sev[s], f'{what}["severity"][{s!r}]') for s in severities
            },
            'mean': pair(res.get('mean'), f'{what}["mean"]'),
        }
    per_category = {}
    for category, res in (corr.get('per_category') or {}).items():
        per_category[str(category)] = pair(
            res, f'summary["corruptions"]["per_category"][{category!r}]'
        )
    # mIoU of each category at each severity (the plot of mIoU against
    # severity): the mean over its corruptions, as the category's mean over all
    # severities is (both from the unrounded numbers of the file)
    per_category_severity = {}
    for category in per_category:
        names = [
            n for n, r in corr['per_corruption'].items() if r['category'] == category
        ]
        per_category_severity[category] = {
            s: {
                m: _pct(
                    sum(corr['per_corruption'][n]['severity'][s][m] for n in names)
                    / len(names),
                    f'the {category} mean at severity {s}',
                    where,
                )
                for m in ('mIoU', 'aAcc')
            }
            for s in severities
        }

    def optional(key):
        res = corr.get(key)
        return pair(res, f'summary["corruptions"][{key!r}]') if res else None

    info = results.corruptions or {}
    checkpoint = results.checkpoint
    num_images = summary.get('num_images')
    clean = pair(summary['clean'], 'summary["clean"]')
    return {
        'name': str(name) if name is not None else _default_name(checkpoint),
        'num_images': int(num_images) if num_images is not None else None,
        'attack': None,
        'steps': None,
        'refine_steps': None,
        'miou_candidates': False,
        'seed': results.seed,
        'checkpoint': str(checkpoint) if checkpoint is not None else None,
        # the adversarial table's clean aACC is the mean over images, which a
        # corruption evaluation does not record (its clean aAcc is pooled)
        'clean': {'mIoU': clean['mIoU'], 'aAcc': None},
        'eps': {},
        'flags': None,
        'corruptions': {
            'num_images': int(num_images) if num_images is not None else None,
            'seed': int(info.get('seed', results.seed) or 0),
            'checkpoint': str(checkpoint) if checkpoint is not None else None,
            'severities': [int(s) for s in severities],
            'names': list(per_corruption),
            'clean': clean,
            'mPC': optional('mPC'),
            'rPC': optional('rPC'),
            'mPC_all': optional('mPC_all'),
            'rPC_all': optional('rPC_all'),
            'mPC_corruptions': [str(n) for n in corr.get('mPC_corruptions') or []],
            'per_category': per_category,
            'per_category_severity': per_category_severity,
            'per_corruption': per_corruption,
        },
    }


def load_rows(
    sources: Sequence[Union[str, os.PathLike, dict]],
    names: Optional[Sequence[Optional[str]]] = None,
) -> List[dict]:
    """The rows of several results files, those of one model merged.

    Files whose rows have the same name (by default the checkpoint's folder:
    :func:`load_result`) are one model: its adversarial file and its corruption
    file make one row with both results (:func:`merge_rows`).

    Args:
        sources (sequence): paths of ``robustness_<timestamp>.json`` files
            (adversarial or corruption evaluations) or their loaded content.
        names (sequence, optional): a model name per source (None: the
            default name).

    Returns:
        list[dict]: one row per model, in the order of their first file.

    Raises:
        ValueError: a file that is not a results file; two files of one kind
            (two adversarial or two corruption results) for one name; files of
            one name from different checkpoints.
    """
    if isinstance(sources, (str, os.PathLike, dict)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise ValueError(
            'No results files given: pass robustness_<timestamp>.json paths.'
        )
    if names is None:
        names = [None] * len(sources)
    names = list(names)
    if len(names) != len(sources):
        raise ValueError(
            f'{len(names)} names for {len(sources)} results files: give one name '
            'per file (None for the default).'
        )
    rows = [load_result(src, name) for src, name in zip(sources, names)]
    labels = [
        os.fspath(src) if isinstance(src, (str, os.PathLike)) else f'results #{i + 1}'
        for i, src in enumerate(sources)
    ]
    return _merge(rows, labels)


def merge_rows(rows: Sequence[dict]) -> List[dict]:
    """Merge the rows of one model (same name): at most one with adversarial
    results and one with corruption results make one row with both (the
    adversarial row's fields, ``corruptions`` from the other).

    Args:
        rows (sequence of dict): rows from :func:`load_result`.

    Returns:
        list[dict]: one row per name, in the order of first appearance (the
        given rows are not modified).

    Raises:
        ValueError: two rows of one kind, or from different checkpoints, under
            one name.
    """
    rows = _check_rows(rows)
    return _merge(rows, [f'row {i}' for i in range(len(rows))])


def _kinds(row: dict) -> List[str]:
    """The results a row holds: ``'adversarial'``, ``'corruption'`` or both."""
    kinds = ['adversarial'] if row['eps'] else []
    if row.get('corruptions'):
        kinds.append('corruption')
    return kinds or ['adversarial']


def _merge(rows: List[dict], labels: List[str]) -> List[dict]:
    merged: Dict[str, dict] = {}
    seen: Dict[str, Dict[str, str]] = {}
    for row, label in zip(rows, labels):
        name = str(row['name'])
        kinds = seen.setdefault(name, {})
        for kind in _kinds(row):
            if kind in kinds:
                raise ValueError(
                    f'Two {kind} results for the model {name!r}: {kinds[kind]} and '
                    f'{label}. Pass one {kind} results file per model, or give the '
                    'files different names.'
                )
        if name in merged:
            other = merged[name]
            ckpts = {
                osp.normpath(c) for c in (row['checkpoint'], other['checkpoint']) if c
            }
            if len(ckpts) > 1:
                raise ValueError(
                    f'The results named {name!r} ({next(iter(kinds.values()))} and '
                    f'{label}) come from different checkpoints '
                    f'({", ".join(sorted(ckpts))}): give the models different names.'
                )
            if row['eps']:
                merged[name] = dict(row, corruptions=other.get('corruptions'))
            else:
                other['corruptions'] = row['corruptions']
        else:
            merged[name] = dict(row)
        kinds.update((kind, label) for kind in _kinds(row))
    return list(merged.values())


def _row_flags(flags) -> Optional[List[dict]]:
    if flags is None:
        return None
    return [
        {k: str(f.get(k, '')) for k in ('code', 'level', 'message', 'fix')}
        for f in flags
        if isinstance(f, dict) and not _information_only(f)
    ]


def _information_only(flag: dict) -> bool:
    """A ``robust_above_clean`` of a file written by the earlier rule (any
    attack above clean on some image) whose worst case was above clean on no
    image: the current rule (docs/flags.md) raises no flag for it, so the report
    does not list it as one."""
    if flag.get('code') != 'robust_above_clean':
        return False
    details = flag.get('details')
    eps = details.get('eps') if isinstance(details, dict) else None
    if not isinstance(eps, dict) or not eps:
        return False
    entries = list(eps.values())
    return all(
        isinstance(v, dict) and 'single_attack' not in v and v.get('worst_case') == 0
        for v in entries
    )


def format_flags(rows: Sequence[dict]) -> List[str]:
    """Markdown lines on the self-checks of the rows' adversarial evaluations
    (docs/flags.md): one bullet per flag, or a line saying that none was
    raised."""
    lines = []
    unchecked = []
    rows = _adversarial_rows(rows)
    for row in rows:
        flags = row.get('flags')
        if flags is None:
            unchecked.append(str(row['name']))
            continue
        for f in flags:
            lines.append(
                f'- {row["name"]}: **{f["level"]} `{f["code"]}`**: {f["message"]} '
                f'Fix: {f["fix"]}'
            )
    head = 'Self-checks (docs/flags.md): '
    if lines:
        flagged = list(dict.fromkeys(str(r['name']) for r in rows if r.get('flags')))
        lines.insert(
            0,
            head + f'flags raised for {", ".join(flagged)}. Each flag below says what '
            "it found and which of that model's numbers it concerns; the other "
            "models' numbers are not affected.",
        )
        lines.insert(1, '')
    else:
        lines.append(head + 'no flags raised.')
    if unchecked:
        lines.append('')
        lines.append(
            'Evaluated without self-checks (results files before schema 3): '
            + ', '.join(unchecked)
            + '.'
        )
    return lines


def _check_rows(rows: Sequence[dict]) -> List[dict]:
    if isinstance(rows, dict):
        rows = [rows]
    rows = list(rows)
    if not rows:
        raise ValueError('No rows given: pass a list of rows from load_result().')
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(k not in row for k in _ROW_KEYS):
            raise ValueError(
                f'Row {i} is not a result row (needs the keys '
                f'{_ROW_KEYS}); build rows with load_result().'
            )
    return rows


def _adversarial_rows(rows: Sequence[dict]) -> List[dict]:
    """The rows with adversarial results (ValueError if none has any)."""
    rows = [r for r in _check_rows(rows) if r['eps']]
    if not rows:
        raise ValueError(
            'No row has adversarial results (all come from corruption results '
            'files): use format_corruption_table() for them, or add the '
            'robustness_<timestamp>.json of tools/test.py ... evaluator=SEA.'
        )
    return rows


def _corruption_rows(rows: Sequence[dict]) -> List[dict]:
    """The rows with corruption results (ValueError if none has any)."""
    rows = [r for r in _check_rows(rows) if r.get('corruptions')]
    if not rows:
        raise ValueError(
            'No row has corruption results: pass the robustness_<timestamp>.json '
            'written by tools/test.py CFG CKPT --cfg-options evaluator=Corruptions '
            "(load_rows() merges it with the same model's adversarial results)."
        )
    return rows


def _union_eps(rows: Sequence[dict]) -> List[str]:
    keys = {}
    for row in rows:
        for key in row['eps']:
            keys.setdefault(float(key), str(key))
    return [keys[v] for v in sorted(keys)]


def _attack_name(rows: Sequence[dict]) -> str:
    names = {row.get('attack') or 'robust' for row in rows}
    return names.pop() if len(names) == 1 else 'robust'


def _fmt(value) -> str:
    if value is None:
        return '-'
    value = float(value)
    return f'{value:.1f}' if math.isfinite(value) else '-'


def _table_cells(rows: Sequence[dict]):
    eps_keys = _union_eps(rows)
    attack = _attack_name(rows)
    header = ['model', 'clean mIoU', 'clean aACC']
    for key in eps_keys:
        header += [f'{attack} ε={key}/255 mIoU', f'{attack} ε={key}/255 aACC']
    body = []
    for row in rows:
        cells = [
            str(row['name']),
            _fmt(row['clean'].get('mIoU')),
            _fmt(row['clean'].get('aAcc')),
        ]
        for key in eps_keys:
            res = row['eps'].get(key) or {}
            cells += [_fmt(res.get('mIoU')), _fmt(res.get('aAcc'))]
        body.append(cells)
    return header, body


def format_table(rows: Sequence[dict], fmt: str = 'markdown') -> str:
    """A table with one line per model: clean and per-eps robust mIoU/aACC.

    Args:
        rows (sequence of dict): rows from :func:`load_result` (those without
            adversarial results are left out: :func:`format_corruption_table`).
        fmt (str): ``'markdown'`` (GitHub table) or ``'text'`` (aligned plain text
            for a terminal).

    Returns:
        str: the table (no trailing newline). Numbers are percentages with one
        decimal; ``-`` marks an eps a model was not evaluated at. The columns are
        the union of the rows' eps in numeric order, labelled with the rows'
        attack (``robust`` if the rows used different attacks).
    """
    _check_format(fmt)
    return _render(*_table_cells(_adversarial_rows(rows)), fmt)


def _check_format(fmt: str) -> None:
    if fmt not in _TABLE_FORMATS:
        raise ValueError(f'Unknown table format {fmt!r}: use one of {_TABLE_FORMATS}.')


def _render(header: List[str], body: List[List[str]], fmt: str) -> str:
    """A GitHub Markdown table or an aligned plain-text one (first column
    left-aligned, the numbers right-aligned)."""
    if fmt == 'markdown':

        def line(cells):
            cells = [c.replace('|', '\\|') for c in cells]
            return '| ' + ' | '.join(cells) + ' |'

        lines = [line(header), '|' + '|'.join('---' for _ in header) + '|']
        lines += [line(cells) for cells in body]
        return '\n'.join(lines)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def text_line(cells):
        out = [cells[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return '  '.join(out).rstrip()

    lines = [text_line(header), '  '.join('-' * w for w in widths)]
    lines += [text_line(cells) for cells in body]
    return '\n'.join(lines)


def _curve_points(row: dict, metric: str):
    points = [(0.0, row['clean'].get(metric))]
    for key, res in row['eps'].items():
        points.append((float(key), (res or {}).get(metric)))
    points = sorted((x, y) for x, y in points if y is not None)
    return [x for x, _ in points], [y for _, y in points]


def _row_budget(row: dict) -> str:
    parts = [str(row.get('attack') or 'attack')]
    steps = row.get('steps')
    parts.append(
        f'{steps} iterations per attack'
        if steps is not None
        else 'iterations differ between attacks'
    )
    if row.get('refine_steps'):
        parts.append(f'a refinement of {row["refine_steps"]} iterations')
    if row.get('miou_candidates'):
        parts.append("the members' mIoU candidates")
    images = row.get('num_images')
    if images is not None:
        parts.append(f'{images} images')
    eps = list(row['eps'])
    if eps:
        parts.append(f'ε = {", ".join(eps)}/255')
    return ', '.join(parts)


def evaluation_budget(rows: Sequence[dict]) -> str:
    """Which attack budget produced the rows' robust numbers, in words:
    the attack, its iterations per attack, the number of images and the radii,
    e.g. ``'SEA, 100 iterations per attack, 24 images, ε = 4, 8/255'``.
    Rows evaluated with different budgets are listed one by one
    (``'clean: ...; PIR-AT: ...'``).

    Args:
        rows (sequence of dict): rows from :func:`load_result`.

    Returns:
        str: the budget (no trailing period).
    """
    rows = _adversarial_rows(rows)
    budgets = [_row_budget(row) for row in rows]
    if len(set(budgets)) == 1:
        return budgets[0]
    return '; '.join(f'{row["name"]}: {b}' for row, b in zip(rows, budgets))


def _curve_figure(rows: Sequence[dict], title: Optional[str] = None) -> Figure:
    """The robustness-curve figure (not saved): mIoU and aACC against eps."""
    rows = _adversarial_rows(rows)
    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    xticks = [0.0] + [float(k) for k in _union_eps(rows)]
    attack = _attack_name(rows)
    for ax, metric, label in zip(axes, ('mIoU', 'aAcc'), ('mIoU (%)', 'aACC (%)')):
        for row in rows:
            xs, ys = _curve_points(row, metric)
            ax.plot(xs, ys, marker='o', label=str(row['name']))
        ax.set_xlabel('ε (/255)')
        ax.set_ylabel(label)
        ax.set_ylim(0, 100)
        ax.set_xticks(xticks)
        ax.set_xticklabels([f'{x:g}' for x in xticks])
        ax.grid(True, alpha=0.3)
        ax.set_title(f'{label.split()[0]} under {attack} (ε=0: clean)', fontsize=10)
    axes[0].legend(fontsize=8, loc='best')
    budget = evaluation_budget(rows)
    fig.suptitle(f'{title}\n{budget}' if title else budget, fontsize=10)
    fig.tight_layout()
    return fig


def plot_robustness_curve(
    rows: Sequence[dict], out_file: str, title: Optional[str] = None
) -> str:
    """Plot mIoU and aACC (%) against the radius, one line per model, with
    the attack budget that produced them (:func:`evaluation_budget`) under
    the title.

    Args:
        rows (sequence of dict): rows from :func:`load_result`.
        out_file (str): path of the PNG to write (its folder is created).
        title (str, optional): figure title.

    Returns:
        str: ``out_file``.
    """
    fig = _curve_figure(rows, title)
    folder = osp.dirname(os.fspath(out_file))
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(out_file, dpi=120)
    return os.fspath(out_file)


# ------------------------------------------------------------- corruptions


def _row_corruption_budget(row: dict) -> str:
    corr = row['corruptions']
    names = corr['names']
    bench = corr.get('mPC_corruptions') or []
    if len(names) == 15 and set(names) == set(bench):
        what = 'the 15 benchmark corruptions'
    elif len(names) == 19:
        what = 'all 19 corruptions (15 benchmark, 4 held-out)'
    else:
        what = f'{len(names)} corruption{"s" * (len(names) > 1)} ({", ".join(names)})'
    sev = corr['severities']
    parts = [
        what,
        f'severit{"ies" if len(sev) > 1 else "y"} {", ".join(map(str, sev))}',
    ]
    if corr.get('num_images') is not None:
        parts.append(f'{corr["num_images"]} images')
    parts.append(f'seed {corr.get("seed", 0)}')
    return ', '.join(parts)


def corruption_budget(rows: Sequence[dict]) -> str:
    """Which corruption evaluation produced the rows' corruption numbers, in
    words, e.g. ``'the 15 benchmark corruptions, severities 1, 2, 3, 4, 5, 24
    images, seed 0'``; rows evaluated differently are listed one by one.

    Args:
        rows (sequence of dict): rows from :func:`load_result` /
            :func:`load_rows` (those without corruption results are left out).

    Returns:
        str: the budget (no trailing period).
    """
    rows = _corruption_rows(rows)
    budgets = [_row_corruption_budget(row) for row in rows]
    if len(set(budgets)) == 1:
        return budgets[0]
    return '; '.join(f'{row["name"]}: {b}' for row, b in zip(rows, budgets))


def _categories(rows: Sequence[dict]) -> List[str]:
    out = {}
    for row in rows:
        for category in row['corruptions']['per_category']:
            out.setdefault(category, None)
    return list(out)


def format_corruption_table(rows: Sequence[dict], fmt: str = 'markdown') -> str:
    """A table with one line per model: the corruption evaluation's clean
    mIoU, mPC and rPC, the mIoU per corruption category, clean and mPC aAcc.

    Args:
        rows (sequence of dict): rows from :func:`load_result` /
            :func:`load_rows` (those without corruption results are left out).
        fmt (str): ``'markdown'`` or ``'text'``.

    Returns:
        str: the table (no trailing newline); percentages with one decimal,
        ``-`` where a model has no such number (no benchmark corruption
        evaluated: no mPC; a category not evaluated).
    """
    _check_format(fmt)
    rows = _corruption_rows(rows)
    categories = _categories(rows)
    header = ['model', 'clean mIoU', 'mPC mIoU', 'rPC mIoU']
    header += [f'{c} mIoU' for c in categories] + ['clean aAcc', 'mPC aAcc']
    body = []
    for row in rows:
        corr = row['corruptions']
        mpc, rpc = corr.get('mPC') or {}, corr.get('rPC') or {}
        cells = [str(row['name']), _fmt(corr['clean']['mIoU'])]
        cells += [_fmt(mpc.get('mIoU')), _fmt(rpc.get('mIoU'))]
        cells += [
            _fmt((corr['per_category'].get(c) or {}).get('mIoU')) for c in categories
        ]
        cells += [_fmt(corr['clean']['aAcc']), _fmt(mpc.get('aAcc'))]
        body.append(cells)
    return _render(header, body, fmt)


def format_corruption_details(row: dict, fmt: str = 'markdown') -> str:
    """One model's mIoU (aAcc) per corruption and severity, with the mean over
    the severities, then each category's mean per severity.

    Args:
        row (dict): a row with corruption results (:func:`load_result`).
        fmt (str): ``'markdown'`` or ``'text'``.

    Returns:
        str: the table (no trailing newline), ``mIoU (aAcc)`` per cell in
        percent with one decimal.
    """
    _check_format(fmt)
    (row,) = _corruption_rows([row])
    corr = row['corruptions']
    sev = [str(s) for s in corr['severities']]

    def cell(res):
        return f'{_fmt(res.get("mIoU"))} ({_fmt(res.get("aAcc"))})'

    header = ['corruption', 'category'] + [f'severity {s}' for s in sev] + ['mean']
    body = []
    for name, res in corr['per_corruption'].items():
        body.append(
            [name, res['category']]
            + [cell(res['severity'][s]) for s in sev]
            + [cell(res['mean'])]
        )
    for category, res in corr['per_category'].items():
        by_sev = corr['per_category_severity'][category]
        body.append(
            [f'{category} (mean)', category]
            + [cell(by_sev[s]) for s in sev]
            + [cell(res)]
        )
    return _render(header, body, fmt)


def _save(fig: Figure, out_file) -> str:
    folder = osp.dirname(os.fspath(out_file))
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(out_file, dpi=120)
    return os.fspath(out_file)


def _heatmap_matrix(row: dict):
    """mIoU per corruption (rows) and severity (columns); NaN where None."""
    import numpy as np

    corr = row['corruptions']
    sev = [str(s) for s in corr['severities']]
    values = [
        [corr['per_corruption'][n]['severity'][s]['mIoU'] for s in sev]
        for n in corr['names']
    ]
    return np.array(
        [[np.nan if v is None else v for v in line] for line in values], dtype=float
    )


def _heatmap_figure(rows: Sequence[dict], title: Optional[str] = None) -> Figure:
    """The heat map (not saved): one panel per model, mIoU per corruption and
    severity on one colour scale (0-100 %)."""
    rows = _corruption_rows(rows)
    layouts = {
        (tuple(r['corruptions']['names']), tuple(r['corruptions']['severities']))
        for r in rows
    }
    shared = len(layouts) == 1
    n_corr = max(len(r['corruptions']['names']) for r in rows)
    n_sev = max(len(r['corruptions']['severities']) for r in rows)
    label_w = 1.4
    panel_w = 0.45 * n_sev + 0.6
    width = label_w * (1 if shared else len(rows)) + panel_w * len(rows) + 1.2
    width, height = max(width, 5.0), 0.3 * n_corr + 1.8
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(rows), squeeze=False)[0]
    n_lines = _suptitle(
        fig,
        title,
        f'mIoU (%) per corruption and severity: {corruption_budget(rows)}',
    )
    # room for the corruption names left of the first (or of every) panel, and
    # for the title above the panels' own
    height += 0.17 * n_lines
    fig.set_figheight(height)
    fig.subplots_adjust(
        left=label_w / width,
        right=1 - 1.2 / width,
        top=1 - (0.55 + 0.17 * n_lines) / height,
        bottom=0.55 / height,
        wspace=0.08 if shared else label_w / panel_w,
    )
    image = None
    for i, (ax, row) in enumerate(zip(axes, rows)):
        corr = row['corruptions']
        matrix = _heatmap_matrix(row)
        image = ax.imshow(
            matrix,
            vmin=0,
            vmax=100,
            cmap='viridis',
            aspect='auto',
            interpolation='nearest',
        )
        for (r, c), v in _iter_cells(matrix):
            ax.text(
                c,
                r,
                f'{v:.0f}',
                ha='center',
                va='center',
                fontsize=6,
                color='white' if v < 50 else 'black',
            )
        ax.set_xticks(range(len(corr['severities'])))
        ax.set_xticklabels([str(s) for s in corr['severities']], fontsize=7)
        ax.set_xlabel('severity', fontsize=8)
        ax.set_yticks(range(len(corr['names'])))
        if i == 0 or not shared:
            ax.set_yticklabels(corr['names'], fontsize=7)
        else:
            ax.set_yticklabels([])
        mpc = (corr.get('mPC') or {}).get('mIoU')
        ax.set_title(
            f'{row["name"]}\nclean {_fmt(corr["clean"]["mIoU"])}, mPC {_fmt(mpc)}',
            fontsize=8,
        )
    cbar = fig.colorbar(
        image,
        cax=fig.add_axes(
            [
                1 - 1.0 / width,
                0.55 / height,
                0.15 / width,
                1 - (1.1 + 0.17 * n_lines) / height,
            ]
        ),
    )
    cbar.set_label('mIoU (%)', fontsize=8)
    return fig


def _suptitle(fig: Figure, title: Optional[str], head: str) -> int:
    """Title the figure with ``title`` and ``head`` wrapped to its width;
    return the number of lines."""
    import textwrap

    width = max(40, int(fig.get_figwidth() * 13))
    lines = ([title] if title else []) + textwrap.wrap(head, width)
    fig.suptitle('\n'.join(lines), fontsize=9)
    return len(lines)


def _iter_cells(matrix):
    import numpy as np

    for (r, c), v in np.ndenumerate(matrix):
        if np.isfinite(v):
            yield (r, c), float(v)


def _severity_figure(rows: Sequence[dict], title: Optional[str] = None) -> Figure:
    """mIoU against severity per category (not saved): one panel per model,
    a line per category, severity 0 being the clean images."""
    rows = _corruption_rows(rows)
    fig = Figure(figsize=(max(3.4 * len(rows), 5.0), 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(rows), squeeze=False)[0]
    for ax, row in zip(axes, rows):
        corr = row['corruptions']
        xs = [0] + [int(s) for s in corr['severities']]
        for category, by_sev in corr['per_category_severity'].items():
            ys = [corr['clean']['mIoU']] + [
                by_sev[str(s)]['mIoU'] for s in corr['severities']
            ]
            ax.plot(
                xs,
                [float('nan') if y is None else y for y in ys],
                marker='o',
                label=category,
            )
        ax.set_xticks(xs)
        ax.set_xlabel('severity (0: clean)', fontsize=8)
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
        ax.set_title(str(row['name']), fontsize=9)
    axes[0].set_ylabel('mIoU (%)')
    axes[0].legend(fontsize=7, loc='lower left')
    _suptitle(
        fig,
        title,
        f'mIoU per corruption category against severity: {corruption_budget(rows)}',
    )
    fig.tight_layout()
    return fig


def plot_corruption_heatmap(
    rows: Sequence[dict], out_file: str, title: Optional[str] = None
) -> str:
    """Plot the mIoU (%) per corruption and severity as a heat map, one panel
    per model with corruption results, on one colour scale.

    Args:
        rows (sequence of dict): rows from :func:`load_result` /
            :func:`load_rows`.
        out_file (str): path of the PNG to write (its folder is created).
        title (str, optional): figure title.

    Returns:
        str: ``out_file``.
    """
    return _save(_heatmap_figure(rows, title), out_file)


def plot_corruption_severity(
    rows: Sequence[dict], out_file: str, title: Optional[str] = None
) -> str:
    """Plot the mIoU (%) of each corruption category (the mean over its
    corruptions) against the severity, severity 0 being the clean images; one
    panel per model with corruption results.

    Args:
        rows (sequence of dict): rows from :func:`load_result` /
            :func:`load_rows`.
        out_file (str): path of the PNG to write (its folder is created).
        title (str, optional): figure title.

    Returns:
        str: ``out_file``.
    """
    return _save(_severity_figure(rows, title), out_file)


def format_overview_table(rows: Sequence[dict], fmt: str = 'markdown') -> str:
    """Adversarial and corruption robustness side by side, one line per model:
    clean mIoU, the robust mIoU per eps, mPC and rPC (mIoU).

    Args:
        rows (sequence of dict): rows from :func:`load_rows` (or
            :func:`merge_rows`).
        fmt (str): ``'markdown'`` or ``'text'``.

    Returns:
        str: the table; ``-`` where a model lacks that evaluation. The clean
        mIoU is the adversarial evaluation's (the corruption evaluation's
        where the model has no adversarial results).
    """
    _check_format(fmt)
    rows = _check_rows(rows)
    adversarial = [r for r in rows if r['eps']]
    eps_keys = _union_eps(adversarial)
    attack = _attack_name(adversarial) if adversarial else 'robust'
    header = ['model', 'clean mIoU']
    header += [f'{attack} ε={k}/255 mIoU' for k in eps_keys]
    header += ['corruptions mPC mIoU', 'corruptions rPC mIoU']
    body = []
    for row in rows:
        corr = row.get('corruptions') or {}
        clean = row['clean'].get('mIoU')
        if not row['eps'] and corr:
            clean = corr['clean']['mIoU']
        cells = [str(row['name']), _fmt(clean)]
        cells += [_fmt((row['eps'].get(k) or {}).get('mIoU')) for k in eps_keys]
        cells += [
            _fmt((corr.get('mPC') or {}).get('mIoU')),
            _fmt((corr.get('rPC') or {}).get('mIoU')),
        ]
        body.append(cells)
    return _render(header, body, fmt)


def shared_settings(rows: Sequence[dict]) -> Dict[str, object]:
    """The settings all rows share (attack, iterations, images, seed); of the
    rows with adversarial results when there are any."""
    rows = _check_rows(rows)
    rows = [r for r in rows if r['eps']] or rows
    settings = {}
    for label, key in (
        ('attack', 'attack'),
        ('iterations', 'steps'),
        ('images', 'num_images'),
        ('seed', 'seed'),
    ):
        values = {row.get(key) for row in rows}
        if len(values) == 1 and None not in values:
            settings[label] = values.pop()
    return settings


def write_report(
    rows: Sequence[dict],
    out_dir: str,
    title: str = 'Robustness report',
    settings: Optional[dict] = None,
    print_table: bool = True,
) -> Dict[str, str]:
    """Write a Markdown report, its JSON and its plots.

    Adversarial results: the table (:func:`format_table`), the robustness
    curve and the self-checks; the report and the plot say which attack budget
    produced the robust numbers (:func:`evaluation_budget`: attack, iterations
    per attack, images, eps). Corruption results: the table of clean, mPC,
    rPC and the categories (:func:`format_corruption_table`), the heat map of
    mIoU per corruption and severity, mIoU against severity per category, and
    a table per model of every corruption and severity
    (:func:`format_corruption_details`), with the corruptions, severities and
    images used (:func:`corruption_budget`). Models with both: an overview
    table with both side by side (:func:`format_overview_table`) first.

    Args:
        rows (sequence of dict): rows from :func:`load_result` or
            :func:`load_rows`; rows of one name are merged
            (:func:`merge_rows`).
        out_dir (str): output folder (created if needed).
        title (str): report title.
        settings (dict, optional): evaluation settings listed in the report (e.g.
            ``attack``, ``iterations``, ``images``, ``seed``, ``machine``,
            ``date``). Defaults to the attack, iterations, number of images and
            seed when all rows share them.
        print_table (bool): print the plain-text tables to stdout.

    Returns:
        dict: paths ``{'markdown': .../report.md, 'json': .../report.json}``,
        with adversarial results ``'plot': .../robustness_curve.png``, with
        corruption results ``'corruption_heatmap': .../corruption_heatmap.png``
        and ``'corruption_severity': .../corruption_severity.png``.
    """
    rows = merge_rows(rows)
    if settings is None:
        settings = shared_settings(rows)
    elif not isinstance(settings, dict):
        raise ValueError(
            'settings should be a dict of name -> value (e.g. '
            f"{{'attack': 'SEA'}}), got {type(settings).__name__}."
        )
    adversarial = [r for r in rows if r['eps']]
    corrupted = [r for r in rows if r.get('corruptions')]
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        'markdown': osp.join(out_dir, 'report.md'),
        'json': osp.join(out_dir, 'report.json'),
    }
    lines = [f'# {title}', '']
    if settings:
        items = ', '.join(f'{k}: {v}' for k, v in settings.items())
        lines += [f'Settings: {items}', '']
    both = adversarial and corrupted
    if any(r['eps'] and r.get('corruptions') for r in rows):
        lines += [
            '## Overview',
            '',
            'mIoU in %: clean, under the attack (worst case) and under the common '
            'corruptions (mPC: the mean over corruptions and severities; rPC: mPC '
            'relative to clean, docs/algorithms.md section 8).',
            '',
            format_overview_table(rows, 'markdown'),
            '',
        ]
    if adversarial:
        paths['plot'] = osp.join(out_dir, 'robustness_curve.png')
        plot_robustness_curve(adversarial, paths['plot'], title=title)
        if both:
            lines += ['## Adversarial robustness', '']
        lines += [f'Robust numbers from: {evaluation_budget(adversarial)}.', '']
        lines += [
            'Numbers in %. Robust numbers are the worst case over the attacks at '
            'each radius ε; aACC is the mean over images of the per-image pixel '
            'accuracy.',
            '',
            format_table(adversarial, 'markdown'),
            '',
            f'![robustness curve]({osp.basename(paths["plot"])})',
            '',
        ]
        lines += format_flags(adversarial) + ['']
    if corrupted:
        paths['corruption_heatmap'] = osp.join(out_dir, 'corruption_heatmap.png')
        paths['corruption_severity'] = osp.join(out_dir, 'corruption_severity.png')
        plot_corruption_heatmap(corrupted, paths['corruption_heatmap'], title=title)
        plot_corruption_severity(corrupted, paths['corruption_severity'], title=title)
        lines += _corruption_section(corrupted, paths, heading=bool(adversarial))
    with open(paths['markdown'], 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines))
    report = {'title': title, 'settings': settings}
    if adversarial:
        report['budget'] = evaluation_budget(adversarial)
    if corrupted:
        report['corruption_budget'] = corruption_budget(corrupted)
    report['models'] = rows
    with open(paths['json'], 'w', encoding='utf-8') as f:
        json.dump(report, f, indent=1, ensure_ascii=False, default=str)
        f.write('\n')
    if print_table:
        if adversarial:
            print(format_table(adversarial, 'text'))
        if corrupted:
            print(format_corruption_table(corrupted, 'text'))
    return paths


def _corruption_section(rows: List[dict], paths: dict, heading: bool) -> List[str]:
    """The report's Markdown lines on the corruption results."""
    lines = ['## Common corruptions', ''] if heading else []
    lines += [
        f'Corruption numbers from: {corruption_budget(rows)}.',
        '',
        'Numbers in %. Each pass (the clean images, or every image under one '
        'corruption at one severity) is scored as mmseg scores a test set: mIoU '
        'and aAcc pooled over the pixels of all images. mPC is the mean over the '
        'benchmark corruptions and the severities, rPC = mPC / clean, each '
        "category's number the mean over its corruptions and the severities "
        "(docs/algorithms.md section 8). Clean is the corruption evaluation's "
        'own clean pass.',
        '',
        format_corruption_table(rows, 'markdown'),
        '',
        f'![mIoU per corruption and severity]'
        f'({osp.basename(paths["corruption_heatmap"])})',
        '',
        f'![mIoU against severity per category]'
        f'({osp.basename(paths["corruption_severity"])})',
        '',
    ]
    for row in rows:
        lines += [
            f'{"###" if heading else "##"} {row["name"]}: mIoU (aAcc) per '
            'corruption and severity',
            '',
            format_corruption_details(row, 'markdown'),
            '',
        ]
    return lines
