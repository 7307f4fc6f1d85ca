"""Results tables, JSON/Markdown reports and robustness curves from the
``robustness_<timestamp>.json`` files written by the robustness evaluation.

A *row* (one evaluated model) is the plain dict returned by :func:`load_result`;
all its numbers are percentages. Every function here needs only numpy, matplotlib
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
    'evaluation_budget',
    'format_flags',
    'format_table',
    'load_result',
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
    eps_results = summary.get('eps') or {}
    attacks = [a for a in results.attacks or [] if isinstance(a, dict)]
    first = attacks[0] if attacks else {}
    attack = str(first.get('name', first.get('type', 'robust')))
    if len(attacks) > 1:
        # several attacks: the names their results are recorded under
        recorded = next(iter(eps_results.values()), {}).get('attacks') or {}
        attack = ' + '.join(recorded) or attack
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
        'seed': int(seed) if seed is not None else None,
        'checkpoint': str(checkpoint) if checkpoint is not None else None,
        'clean': {
            'mIoU': _metric(clean, 'mIoU', 'summary["clean"]', where),
            'aAcc': _metric(clean, 'aAcc_img', 'summary["clean"]', where),
        },
        'eps': row_eps,
        'flags': _row_flags(results.flags),
    }


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
    """Markdown lines on the self-checks of the rows (docs/flags.md): one
    bullet per flag, or a line saying that none was raised."""
    lines = []
    unchecked = []
    for row in _check_rows(rows):
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
        flagged = list(
            dict.fromkeys(str(r['name']) for r in _check_rows(rows) if r.get('flags'))
        )
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
        rows (sequence of dict): rows from :func:`load_result`.
        fmt (str): ``'markdown'`` (GitHub table) or ``'text'`` (aligned plain text
            for a terminal).

    Returns:
        str: the table (no trailing newline). Numbers are percentages with one
        decimal; ``-`` marks an eps a model was not evaluated at. The columns are
        the union of the rows' eps in numeric order, labelled with the rows'
        attack (``robust`` if the rows used different attacks).
    """
    if fmt not in _TABLE_FORMATS:
        raise ValueError(f'Unknown table format {fmt!r}: use one of {_TABLE_FORMATS}.')
    header, body = _table_cells(_check_rows(rows))
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
    rows = _check_rows(rows)
    budgets = [_row_budget(row) for row in rows]
    if len(set(budgets)) == 1:
        return budgets[0]
    return '; '.join(f'{row["name"]}: {b}' for row, b in zip(rows, budgets))


def _curve_figure(rows: Sequence[dict], title: Optional[str] = None) -> Figure:
    """The robustness-curve figure (not saved): mIoU and aACC against eps."""
    rows = _check_rows(rows)
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


def shared_settings(rows: Sequence[dict]) -> Dict[str, object]:
    """The settings all rows share (attack, iterations, images, seed)."""
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
    """Write a Markdown report, its JSON and the robustness curve. The
    report and the plot say which attack budget produced the robust numbers
    (:func:`evaluation_budget`: attack, iterations per attack, images, eps).

    Args:
        rows (sequence of dict): rows from :func:`load_result`.
        out_dir (str): output folder (created if needed).
        title (str): report title.
        settings (dict, optional): evaluation settings listed in the report (e.g.
            ``attack``, ``iterations``, ``images``, ``seed``, ``machine``,
            ``date``). Defaults to the attack, iterations, number of images and
            seed when all rows share them.
        print_table (bool): print the plain-text table to stdout.

    Returns:
        dict: paths ``{'markdown': .../report.md, 'json': .../report.json,
        'plot': .../robustness_curve.png}``.
    """
    rows = _check_rows(rows)
    if settings is None:
        settings = shared_settings(rows)
    elif not isinstance(settings, dict):
        raise ValueError(
            'settings should be a dict of name -> value (e.g. '
            f"{{'attack': 'SEA'}}), got {type(settings).__name__}."
        )
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        'markdown': osp.join(out_dir, 'report.md'),
        'json': osp.join(out_dir, 'report.json'),
        'plot': osp.join(out_dir, 'robustness_curve.png'),
    }
    plot_robustness_curve(rows, paths['plot'], title=title)

    lines = [f'# {title}', '']
    if settings:
        items = ', '.join(f'{k}: {v}' for k, v in settings.items())
        lines += [f'Settings: {items}', '']
    lines += [f'Robust numbers from: {evaluation_budget(rows)}.', '']
    lines += [
        'Numbers in %. Robust numbers are the worst case over the attacks at each '
        'radius ε; aACC is the mean over images of the per-image pixel accuracy.',
        '',
        format_table(rows, 'markdown'),
        '',
        f'![robustness curve]({osp.basename(paths["plot"])})',
        '',
    ]
    lines += format_flags(rows) + ['']
    with open(paths['markdown'], 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines))
    with open(paths['json'], 'w', encoding='utf-8') as f:
        json.dump(
            {
                'title': title,
                'settings': settings,
                'budget': evaluation_budget(rows),
                'models': rows,
            },
            f,
            indent=1,
            ensure_ascii=False,
            default=str,
        )
        f.write('\n')
    if print_table:
        print(format_table(rows, 'text'))
    return paths
