"""The report of corruption results: rows from the files CorruptionMetric
writes, their tables and plots, and the merge with a model's adversarial
results."""

import json
import os.path as osp

import numpy as np
import pytest

from mmseg_robust.evaluation.results import RobustnessResults, write_results
from mmseg_robust.reporting import (
    corruption_budget,
    format_corruption_details,
    format_corruption_table,
    format_overview_table,
    format_table,
    load_result,
    load_rows,
    merge_rows,
    plot_corruption_heatmap,
    plot_corruption_severity,
    write_report,
)
from mmseg_robust.reporting.report import _heatmap_figure, _severity_figure

# a holdout corruption too: mPC is over the benchmark ones only
NAMES = ['gaussian_noise', 'shot_noise', 'defocus_blur', 'fog', 'contrast']
NAMES_ALL = NAMES + ['speckle_noise']
SEVERITIES = [1, 3, 5]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _cells(table):
    """Header and body cells of a Markdown table."""
    lines = table.splitlines()
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in lines]
    return rows[0], rows[2:]


def _close(cell, value):
    """A table cell shows ``value``: the row's number (2 decimals) with one
    decimal."""
    return abs(float(cell) - value) <= 0.055 + 1e-9


def _sea_file(folder, checkpoint, clean_miou, robust):
    """An adversarial results file (SEA, worst case per eps)."""
    eps = {
        key: dict(attacks={}, worst_case=dict(mIoU=v, mIoU_best=v, aAcc_img=v + 30))
        for key, v in robust.items()
    }
    summary = dict(
        num_images=6,
        clean=dict(mIoU=clean_miou, aAcc=95.0, aAcc_img=94.0),
        eps=eps,
    )
    return write_results(
        RobustnessResults(
            summary=summary,
            metrics={},
            worst_case_modes=['best'],
            attacks=[dict(type='SEA', steps=10)],
            eps=[float(k) for k in robust],
            checkpoint=checkpoint,
            timestamp='20261206_110000',
            flags=[],
        ),
        str(folder),
    )


def _category_means(summary, category, severities):
    """mIoU of a category at each severity: the mean over its corruptions."""
    per = summary['corruptions']['per_corruption']
    names = [n for n, r in per.items() if r['category'] == category]
    return [
        np.mean([per[n]['severity'][str(s)]['mIoU'] for n in names]) for s in severities
    ]


def test_row_and_tables_show_the_summarys_numbers(corruption_results, tmp_path):
    path, summary = corruption_results.write_corruption_results(
        tmp_path, NAMES_ALL, SEVERITIES, checkpoint='work_dirs/m/iter_10.pth'
    )
    corr = summary['corruptions']
    row = load_result(path)
    assert row['name'] == 'm' and row['eps'] == {} and row['attack'] is None
    rc = row['corruptions']
    assert rc['names'] == NAMES_ALL and rc['severities'] == SEVERITIES
    assert rc['mPC_corruptions'] == NAMES
    for m in ('mIoU', 'aAcc'):
        assert rc['clean'][m] == round(summary['clean'][m], 2)
        for key in ('mPC', 'rPC', 'mPC_all', 'rPC_all'):
            assert rc[key][m] == round(corr[key][m], 2)
        for name in NAMES_ALL:
            for s in SEVERITIES:
                assert rc['per_corruption'][name]['severity'][str(s)][m] == round(
                    corr['per_corruption'][name]['severity'][str(s)][m], 2
                )
    # the category at each severity: the mean over its corruptions; averaged
    # over the severities, the category's number of the summary
    for category, res in corr['per_category'].items():
        by_sev = [
            rc['per_category_severity'][category][str(s)]['mIoU'] for s in SEVERITIES
        ]
        np.testing.assert_allclose(
            by_sev, _category_means(summary, category, SEVERITIES), atol=0.005
        )
        assert np.mean(by_sev) == pytest.approx(res['mIoU'], abs=0.01)

    header, body = _cells(format_corruption_table([row]))
    categories = ['noise', 'blur', 'weather', 'digital', 'holdout']
    assert header == (
        ['model', 'clean mIoU', 'mPC mIoU', 'rPC mIoU']
        + [f'{c} mIoU' for c in categories]
        + ['clean aAcc', 'mPC aAcc']
    )
    expected = [summary['clean']['mIoU'], corr['mPC']['mIoU'], corr['rPC']['mIoU']]
    expected += [corr['per_category'][c]['mIoU'] for c in categories]
    expected += [summary['clean']['aAcc'], corr['mPC']['aAcc']]
    assert body[0][0] == 'm'
    assert all(_close(c, v) for c, v in zip(body[0][1:], expected)), body
    # the worse the corruption, the lower: a table of constructed numbers that
    # are not all alike
    assert len(set(body[0][1:])) > 5

    header, body = _cells(format_corruption_details(row))
    assert header == ['corruption', 'category'] + [
        f'severity {s}' for s in SEVERITIES
    ] + ['mean']
    assert [b[0] for b in body] == NAMES_ALL + [f'{c} (mean)' for c in categories]
    for line, name in zip(body, NAMES_ALL):
        res = corr['per_corruption'][name]
        assert line[1] == res['category']
        for cell, s in zip(line[2:], [str(s) for s in SEVERITIES] + ['mean']):
            miou, acc = cell.rstrip(')').split(' (')
            ref = res['mean'] if s == 'mean' else res['severity'][s]
            assert _close(miou, ref['mIoU']) and _close(acc, ref['aAcc'])
    assert corruption_budget([row]) == (
        '6 corruptions (' + ', '.join(NAMES_ALL) + '), severities 1, 3, 5, '
        '6 images, seed 0'
    )
    text = format_corruption_table([row], 'text')
    assert '|' not in text and len({len(line) for line in text.splitlines()}) == 1


def test_benchmark_budget_and_no_mpc_without_a_benchmark_corruption(
    corruption_results, tmp_path
):
    from mmseg_robust.datasets import BENCHMARK_CORRUPTIONS

    path, _ = corruption_results.write_corruption_results(
        tmp_path / 'a', BENCHMARK_CORRUPTIONS, [2]
    )
    assert corruption_budget([load_result(path)]) == (
        'the 15 benchmark corruptions, severity 2, 6 images, seed 0'
    )
    # only held-out corruptions: no mPC/rPC, '-' in the table
    path, _ = corruption_results.write_corruption_results(
        tmp_path / 'b', ['speckle_noise', 'saturate'], [1, 2]
    )
    row = load_result(path, name='holdout')
    assert row['corruptions']['mPC'] is None and row['corruptions']['rPC'] is None
    _, body = _cells(format_corruption_table([row]))
    assert body[0][2:4] == ['-', '-']


def test_adversarial_and_corruption_files_of_one_model_merge(
    corruption_results, tmp_path
):
    ckpt = 'work_dirs/pirat/iter_10.pth'
    sea = _sea_file(tmp_path / 'sea_pirat', ckpt, 70.0, {'4': 40.0, '8': 20.0})
    corr, summary = corruption_results.write_corruption_results(
        tmp_path / 'corr_pirat', NAMES, SEVERITIES, checkpoint=ckpt
    )
    sea_clean = _sea_file(
        tmp_path / 'sea_clean',
        'work_dirs/clean/iter_10.pth',
        80.0,
        {'4': 5.0, '8': 0.5},
    )
    rows = load_rows([sea, corr, sea_clean])
    assert [r['name'] for r in rows] == ['pirat', 'clean']
    pirat = rows[0]
    assert pirat['eps'] == load_result(sea)['eps'] and pirat['attack'] == 'SEA'
    assert pirat['clean'] == load_result(sea)['clean']
    assert pirat['corruptions'] == load_result(corr)['corruptions']
    assert rows[1]['corruptions'] is None
    # the order of the files does not matter
    assert load_rows([corr, sea, sea_clean]) == rows
    # rows of the same name merge as the files do
    assert merge_rows([load_result(corr), load_result(sea)]) == rows[:1]

    header, body = _cells(format_overview_table(rows))
    assert header == [
        'model',
        'clean mIoU',
        'SEA ε=4/255 mIoU',
        'SEA ε=8/255 mIoU',
        'corruptions mPC mIoU',
        'corruptions rPC mIoU',
    ]
    mpc = summary['corruptions']['mPC']['mIoU']
    rpc = summary['corruptions']['rPC']['mIoU']
    assert body[0][:4] == ['pirat', '70.0', '40.0', '20.0']
    assert _close(body[0][4], mpc) and _close(body[0][5], rpc)
    assert body[1] == ['clean', '80.0', '5.0', '0.5', '-', '-']

    paths = write_report(rows, str(tmp_path / 'report'), print_table=False)
    assert set(paths) == {
        'markdown',
        'json',
        'plot',
        'corruption_heatmap',
        'corruption_severity',
    }
    for key in ('plot', 'corruption_heatmap', 'corruption_severity'):
        with open(paths[key], 'rb') as f:
            assert f.read(8) == PNG_MAGIC
    md = open(paths['markdown'], encoding='utf-8').read()
    assert format_overview_table(rows) in md
    assert format_table(rows) in md  # both models have adversarial results
    assert format_corruption_table(rows) in md  # only pirat has corruptions
    assert len(_cells(format_corruption_table(rows))[1]) == 1
    assert format_corruption_details(pirat) in md
    assert '![mIoU per corruption and severity](corruption_heatmap.png)' in md
    assert '![mIoU against severity per category](corruption_severity.png)' in md
    with open(paths['json'], encoding='utf-8') as f:
        report = json.load(f)
    assert report['models'] == rows
    assert report['budget'] == 'SEA, 10 iterations per attack, 6 images, ε = 4, 8/255'
    assert report['corruption_budget'] == corruption_budget(rows)
    # write_report merges the rows of one name itself
    again = write_report(
        [load_result(sea), load_result(corr)], str(tmp_path / 'r2'), print_table=False
    )
    with open(again['json'], encoding='utf-8') as f:
        assert json.load(f)['models'] == rows[:1]


def test_report_of_corruption_results_only(corruption_results, tmp_path, capsys):
    path, _ = corruption_results.write_corruption_results(
        tmp_path, NAMES, SEVERITIES, checkpoint='work_dirs/m/iter_10.pth'
    )
    rows = load_rows([path])
    paths = write_report(rows, str(tmp_path / 'report'))
    assert set(paths) == {
        'markdown',
        'json',
        'corruption_heatmap',
        'corruption_severity',
    }
    md = open(paths['markdown'], encoding='utf-8').read()
    # no adversarial section (no SEA numbers, no self-checks of an attack)
    assert 'Robust numbers' not in md and 'Self-checks' not in md
    assert f'Corruption numbers from: {corruption_budget(rows)}.' in md
    assert format_corruption_table(rows, 'text') in capsys.readouterr().out
    with open(paths['json'], encoding='utf-8') as f:
        assert 'budget' not in json.load(f)


def test_corruption_plots(corruption_results, tmp_path):
    files = {}
    for i, name in enumerate(('a', 'b')):
        files[name] = corruption_results.write_corruption_results(
            tmp_path / name,
            NAMES_ALL,
            SEVERITIES,
            checkpoint=f'work_dirs/{name}/iter_1.pth',
            seed=i,
            quality=0.9 - 0.2 * i,
        )
    rows = load_rows([files['a'][0], files['b'][0]])
    fig = _heatmap_figure(rows, 'corruptions')
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 2
    for ax, (name, (_, summary)) in zip(panels, files.items()):
        per = summary['corruptions']['per_corruption']
        expected = [
            [per[n]['severity'][str(s)]['mIoU'] for s in SEVERITIES] for n in NAMES_ALL
        ]
        np.testing.assert_allclose(ax.get_images()[0].get_array(), expected, atol=0.005)
        assert ax.get_images()[0].get_clim() == (0, 100)
        assert ax.get_title().startswith(name)
        assert [t.get_text() for t in ax.get_xticklabels()] == ['1', '3', '5']
    assert [t.get_text() for t in panels[0].get_yticklabels()] == NAMES_ALL
    assert fig._suptitle.get_text().startswith('corruptions\nmIoU (%) per corruption')

    fig = _severity_figure(rows)
    assert len(fig.axes) == 2
    for ax, (name, (_, summary)) in zip(fig.axes, files.items()):
        lines = ax.get_lines()
        categories = list(summary['corruptions']['per_category'])
        assert [line.get_label() for line in lines] == categories
        for line, category in zip(lines, categories):
            np.testing.assert_allclose(line.get_xdata(), [0] + SEVERITIES)
            expected = [summary['clean']['mIoU']] + _category_means(
                summary, category, SEVERITIES
            )
            np.testing.assert_allclose(line.get_ydata(), expected, atol=0.006)
        assert ax.get_title() == name and ax.get_ylim() == (0.0, 100.0)

    out = plot_corruption_heatmap(rows, str(tmp_path / 'p' / 'heat.png'))
    assert out == str(tmp_path / 'p' / 'heat.png')
    out2 = plot_corruption_severity(rows, str(tmp_path / 'p' / 'sev.png'))
    for p in (out, out2):
        with open(p, 'rb') as f:
            assert f.read(8) == PNG_MAGIC


def test_bad_corruption_input_errors(corruption_results, tmp_path):
    corr, _ = corruption_results.write_corruption_results(
        tmp_path / 'a', NAMES, SEVERITIES, checkpoint='work_dirs/m/iter_1.pth'
    )
    corr2, _ = corruption_results.write_corruption_results(
        tmp_path / 'b', NAMES, [2], checkpoint='work_dirs/m/iter_1.pth'
    )
    with pytest.raises(ValueError, match='Two corruption results for the model') as e:
        load_rows([corr, corr2])
    assert corr in str(e.value) and corr2 in str(e.value)
    # a merged row already holds its corruption results
    sea = _sea_file(tmp_path / 's1', 'work_dirs/m/iter_1.pth', 70.0, {'8': 1.0})
    (both,) = load_rows([corr, sea])
    with pytest.raises(ValueError, match='Two corruption results'):
        merge_rows([both, load_result(corr2)])
    with pytest.raises(ValueError, match='Two adversarial results'):
        merge_rows([load_result(sea), both])
    # one name, two checkpoints: not one model
    other = _sea_file(tmp_path / 's', 'other/m/iter_1.pth', 70.0, {'8': 1.0})
    with pytest.raises(ValueError, match='different checkpoints'):
        load_rows([corr, other])
    assert [r['name'] for r in load_rows([corr, other], ['m', 'm2'])] == ['m', 'm2']
    with pytest.raises(ValueError, match='one name per file'):
        load_rows([corr, other], ['m'])
    # the tables of one kind name the other
    with pytest.raises(ValueError, match='No row has corruption results.*Corruptions'):
        format_corruption_table([load_result(other)])
    with pytest.raises(ValueError, match='No row has adversarial results'):
        format_table([load_result(corr)])
    # a file that is not what the corruption evaluation wrote
    data = json.loads(open(corr).read())
    del data['summary']['corruptions']['per_corruption']['fog']['severity']['3']
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'fog'.*no result at severity 3") as e:
        load_result(str(bad))
    assert str(bad) in str(e.value)
    data['summary']['corruptions']['per_corruption'] = {}
    with pytest.raises(ValueError, match='holds no corrupted pass'):
        load_result(data)
    assert not osp.exists(tmp_path / 'report')


def test_report_tool_merges_the_files_of_a_model(
    corruption_results, tmp_path, repo_root, capsys
):
    """tools/analysis_tools/robustness_report.py: the files of one model in one
    row; a bad file or a wrong number of names refused with the reason."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        'robustness_report',
        osp.join(repo_root, 'tools', 'analysis_tools', 'robustness_report.py'),
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ckpt = 'work_dirs/pirat/iter_10.pth'
    sea = _sea_file(tmp_path / 'sea', ckpt, 70.0, {'8': 20.0})
    corr, _ = corruption_results.write_corruption_results(
        tmp_path / 'corr', NAMES, SEVERITIES, checkpoint=ckpt
    )
    out = tmp_path / 'report'
    paths = tool.main([sea, corr, '--out-dir', str(out), '--title', 'T'])
    with open(paths['json'], encoding='utf-8') as f:
        report = json.load(f)
    assert report['title'] == 'T' and report['models'] == load_rows([sea, corr])
    assert f'corruption_heatmap: {out / "corruption_heatmap.png"}' in (
        capsys.readouterr().out
    )
    with pytest.raises(SystemExit, match='no robustness summary'):
        bad = tmp_path / 'clean.json'
        bad.write_text('{"mIoU": 50.0}')
        tool.main([str(bad), '--out-dir', str(out)])
    with pytest.raises(SystemExit):
        tool.main([sea, corr, '--names', 'a'])
    assert 'one name per file' in capsys.readouterr().err
