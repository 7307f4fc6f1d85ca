"""Reporting: robustness result rows, tables, reports, curves and picture grids."""

import copy
import json
import os.path as osp

import matplotlib.image as mpimg
import numpy as np
import pytest

from mmseg_robust.reporting import (
    amplified_perturbation,
    colorize,
    evaluation_budget,
    format_flags,
    format_table,
    image_miou,
    load_example,
    load_result,
    plot_robustness_curve,
    save_example,
    save_picture_grid,
    write_report,
)
from mmseg_robust.reporting.pictures import PERTURBATION_KEY, _grid_figure
from mmseg_robust.reporting.report import _curve_figure

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
PALETTE = [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156]]


def _attack_result(miou, acc_img):
    return _percent(dict(mIoU=miou, aAcc=acc_img + 0.01, aAcc_img=acc_img))


def _percent(obj):
    """Fractions -> percent, as the results file holds them."""
    if isinstance(obj, dict):
        return {k: _percent(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_percent(v) for v in obj]
    return obj * 100


def _robustness_json(clean_miou, clean_acc, robust, checkpoint):
    """A robustness result dict (schema version 3, percent); ``robust`` maps
    eps keys to (mIoU, aAcc_img) as fractions."""
    eps = {}
    for key, (miou, acc) in robust.items():
        eps[key] = dict(
            attacks={
                'APGD-Mask-CE-Bal': _attack_result(miou + 0.02, acc + 0.03),
                'APGD-Mask-CE': _attack_result(miou + 0.01, acc + 0.02),
                'APGD-JS-Avg': _attack_result(miou + 0.03, acc + 0.01),
            },
            worst_case=_percent(
                dict(
                    aAcc_img=acc, mIoU=miou, mIoU_best=miou, mIoU_reference=miou + 0.001
                )
            ),
        )
    return {
        'schema_version': 3,
        'unit': 'percent',
        'metrics': {'mIoU': 100 * clean_miou},
        'summary': {
            'num_images': 16,
            # pooled aAcc deliberately differs from aAcc_img: the latter is used
            'clean': _percent(
                dict(
                    mIoU=clean_miou,
                    aAcc=clean_acc + 0.05,
                    aAcc_img=clean_acc,
                    IoU=[0.5, 0.6],
                )
            ),
            'eps': eps,
        },
        'attacks': [dict(type='SEA', n_iter=300, class_weights='voc')],
        'eps': [float(k) for k in robust],
        'seed': 0,
        'checkpoint': checkpoint,
        'timestamp': '20261121_163000',
    }


@pytest.fixture
def results():
    pirat = _robustness_json(
        0.536,
        0.894,
        {'4': (0.30, 0.75), '8': (0.12, 0.43)},
        'work_dirs/pirat_convnext/iter_2000.pth',
    )
    clean = _robustness_json(
        0.612,
        0.921,
        {'4': (0.049, 0.19), '8': (0.0, 0.01)},
        'work_dirs/clean_convnext/iter_2000.pth',
    )
    return pirat, clean


def test_load_result_percent_and_fields(results, tmp_path):
    path = tmp_path / 'robustness_20261121_163000.json'
    path.write_text(json.dumps(results[0]))
    row = load_result(str(path))
    assert row['name'] == 'pirat_convnext'
    assert row['num_images'] == 16 and row['seed'] == 0
    assert row['attack'] == 'SEA' and row['steps'] == 300
    assert row['checkpoint'] == 'work_dirs/pirat_convnext/iter_2000.pth'
    assert row['clean'] == {'mIoU': 53.6, 'aAcc': 89.4}
    assert row['eps'] == {
        '4': {'mIoU': 30.0, 'aAcc': 75.0},
        '8': {'mIoU': 12.0, 'aAcc': 43.0},
    }
    # the dict works as well, with an explicit name
    assert load_result(results[0], name='PIR-AT')['name'] == 'PIR-AT'
    assert load_result(results[0], name='PIR-AT')['eps'] == row['eps']


def test_load_result_eps_numeric_order_and_defaults(results):
    data = _robustness_json(
        0.5,
        0.9,
        {'8': (0.2, 0.4), '2': (0.4, 0.8), '16': (0.1, 0.2), '0.5': (0.45, 0.85)},
        None,
    )
    data['attacks'] = [dict(type='PGD', steps=100)]
    row = load_result(data)
    assert list(row['eps']) == ['0.5', '2', '8', '16']
    assert row['eps']['16'] == {'mIoU': 10.0, 'aAcc': 20.0}
    assert row['name'] == 'model' and row['checkpoint'] is None
    assert row['attack'] == 'PGD' and row['steps'] == 100


def test_load_result_without_summary_raises(tmp_path):
    path = tmp_path / 'clean_test.json'
    path.write_text(json.dumps({'mIoU': 53.6, 'aAcc': 89.6}))
    with pytest.raises(ValueError, match='no robustness summary') as info:
        load_result(str(path))
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match='summary'):
        load_result({'metrics': {}, 'summary': None})


def test_format_table_markdown(results):
    rows = [load_result(results[0], 'PIR-AT'), load_result(results[1], 'clean')]
    # a third model evaluated at eps 4 only
    partial = copy.deepcopy(results[0])
    del partial['summary']['eps']['8']
    rows.append(load_result(partial, 'partial'))
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    assert header == [
        'model',
        'clean mIoU',
        'clean aACC',
        'SEA ε=4/255 mIoU',
        'SEA ε=4/255 aACC',
        'SEA ε=8/255 mIoU',
        'SEA ε=8/255 aACC',
    ]
    assert set(lines[1]) <= set('|-: ') and lines[1].count('---') == 7
    cells = [[c.strip() for c in line.strip('|').split('|')] for line in lines[2:]]
    assert cells[0] == ['PIR-AT', '53.6', '89.4', '30.0', '75.0', '12.0', '43.0']
    assert cells[1] == ['clean', '61.2', '92.1', '4.9', '19.0', '0.0', '1.0']
    assert cells[2] == ['partial', '53.6', '89.4', '30.0', '75.0', '-', '-']


def test_format_table_text_and_errors(results):
    rows = [load_result(results[0], 'PIR-AT'), load_result(results[1], 'clean')]
    text = format_table(rows, fmt='text')
    lines = text.splitlines()
    assert len(lines) == 4 and '|' not in text
    assert lines[0].split()[:3] == ['model', 'clean', 'mIoU']
    assert lines[2].split() == [
        'PIR-AT',
        '53.6',
        '89.4',
        '30.0',
        '75.0',
        '12.0',
        '43.0',
    ]
    # columns are aligned: every number ends where its header ends
    assert len({len(line) for line in lines}) == 1
    # different attacks: generic column names
    other = load_result(dict(results[1], attacks=[dict(type='PGD', steps=10)]))
    assert 'robust ε=4/255 mIoU' in format_table([rows[0], other])
    with pytest.raises(ValueError, match='format'):
        format_table(rows, fmt='html')
    with pytest.raises(ValueError, match='load_result'):
        format_table([])


def test_evaluation_budget_in_words(results):
    rows = [load_result(results[0], 'PIR-AT'), load_result(results[1], 'clean')]
    budget = 'SEA, 300 iterations per attack, 16 images, ε = 4, 8/255'
    assert evaluation_budget(rows) == budget
    other = copy.deepcopy(results[1])
    other['attacks'][0]['n_iter'] = 100
    other['summary']['num_images'] = 24
    del other['summary']['eps']['8']
    rows[1] = load_result(other, 'clean')
    assert evaluation_budget(rows) == (
        f'PIR-AT: {budget}; clean: SEA, 100 iterations per attack, 24 images, ε = 4/255'
    )
    # the plot says it too, under the title or alone
    assert _curve_figure(rows, 'curves')._suptitle.get_text() == (
        'curves\n' + evaluation_budget(rows)
    )
    assert _curve_figure(rows[:1])._suptitle.get_text() == budget


def test_a_refining_sea_is_named_apart_from_sea(results):
    """SEA with a refinement stage (docs/algorithms.md 4.1) is not the
    paper's SEA: its rows, tables and budget say so."""
    refined = copy.deepcopy(results[0])
    refined['attacks'][0]['refine_steps'] = 150
    row = load_result(refined, 'PIR-AT')
    assert row['attack'] == 'SEA+Refine' and row['refine_steps'] == 150
    assert evaluation_budget([row]) == (
        'SEA+Refine, 300 iterations per attack, a refinement of 150 iterations, '
        '16 images, ε = 4, 8/255'
    )
    assert 'SEA+Refine ε=8/255 mIoU' in format_table([row], fmt='markdown')
    assert load_result(results[0], 'PIR-AT')['refine_steps'] is None
    # so is SEA with its members' mIoU candidates (4.2)
    both = copy.deepcopy(refined)
    both['attacks'][0]['miou_candidates'] = True
    row = load_result(both, 'PIR-AT')
    assert row['attack'] == 'SEA+Refine+mIoU-iterates' and row['miou_candidates']
    assert evaluation_budget([row]) == (
        'SEA+Refine+mIoU-iterates, 300 iterations per attack, a refinement of 150 '
        "iterations, the members' mIoU candidates, 16 images, ε = 4, 8/255"
    )
    assert not load_result(results[0], 'PIR-AT')['miou_candidates']


def test_flags_paragraph_names_the_models_concerned(results):
    flagged = load_result(results[0], 'PIR-AT')
    flagged['flags'] = [
        dict(
            code='zero_gradients',
            level='warning',
            message='all-zero input gradients on 3 of 16 images.',
            fix='check the input path.',
        )
    ]
    quiet = load_result(results[1], 'clean')
    quiet['flags'] = []
    lines = format_flags([flagged, quiet])
    assert lines[0] == (
        'Self-checks (docs/flags.md): flags raised for PIR-AT. Each flag below '
        "says what it found and which of that model's numbers it concerns; the "
        "other models' numbers are not affected."
    )
    assert 'trustworthy' not in '\n'.join(lines)
    assert lines[2].startswith('- PIR-AT: **warning `zero_gradients`**')
    assert format_flags([quiet]) == ['Self-checks (docs/flags.md): no flags raised.']


def test_curve_figure_lines(results):
    rows = [load_result(results[0], 'PIR-AT'), load_result(results[1], 'clean')]
    fig = _curve_figure(rows, 'curves')
    assert len(fig.axes) == 2
    expected = {
        'mIoU': [[53.6, 30.0, 12.0], [61.2, 4.9, 0.0]],
        'aACC': [[89.4, 75.0, 43.0], [92.1, 19.0, 1.0]],
    }
    for ax, metric in zip(fig.axes, ('mIoU', 'aACC')):
        assert ax.get_ylabel() == f'{metric} (%)'
        assert ax.get_xlabel() == 'ε (/255)'
        assert ax.get_ylim() == (0.0, 100.0)
        lines = ax.get_lines()
        assert len(lines) == 2
        for line, ys, name in zip(lines, expected[metric], ('PIR-AT', 'clean')):
            np.testing.assert_allclose(line.get_xdata(), [0, 4, 8])
            np.testing.assert_allclose(line.get_ydata(), ys)
            assert line.get_label() == name
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ['PIR-AT', 'clean']


def _check_png(path, min_width=100):
    with open(path, 'rb') as f:
        assert f.read(8) == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and img.shape[1] > min_width
    return img


def test_write_report(results, tmp_path, capsys):
    rows = [load_result(results[0], 'PIR-AT'), load_result(results[1], 'clean')]
    settings = {
        'attack': 'SEA',
        'iterations': 300,
        'images': 16,
        'seed': 0,
        'machine': 'test box',
    }
    out_dir = tmp_path / 'report'
    paths = write_report(rows, str(out_dir), title='My report', settings=settings)
    assert paths == {
        'markdown': osp.join(str(out_dir), 'report.md'),
        'json': osp.join(str(out_dir), 'report.json'),
        'plot': osp.join(str(out_dir), 'robustness_curve.png'),
    }
    md = open(paths['markdown'], encoding='utf-8').read()
    assert md.startswith('# My report')
    assert 'iterations: 300' in md and 'machine: test box' in md
    assert format_table(rows) in md
    assert '![robustness curve](robustness_curve.png)' in md
    with open(paths['json'], encoding='utf-8') as f:
        report = json.load(f)
    budget = 'SEA, 300 iterations per attack, 16 images, ε = 4, 8/255'
    assert report == {
        'title': 'My report',
        'settings': settings,
        'budget': budget,
        'models': rows,
    }
    assert f'Robust numbers from: {budget}.' in md
    img = _check_png(paths['plot'])
    assert img.shape[1] > img.shape[0]  # two side-by-side axes
    printed = capsys.readouterr().out
    assert format_table(rows, 'text') in printed
    # default settings come from the rows; nothing printed without print_table
    paths = write_report(rows, str(tmp_path / 'r2'), print_table=False)
    assert capsys.readouterr().out == ''
    with open(paths['json'], encoding='utf-8') as f:
        assert json.load(f)['settings'] == {
            'attack': 'SEA',
            'iterations': 300,
            'images': 16,
            'seed': 0,
        }
    assert plot_robustness_curve(rows, str(tmp_path / 'c.png')) == str(
        tmp_path / 'c.png'
    )


# ---------------------------------------------------------------- pictures


def test_colorize():
    labels = np.array([[0, 1], [255, 3]])
    out = colorize(labels, PALETTE)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == PALETTE[0] and out[0, 1].tolist() == PALETTE[1]
    assert out[1, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == PALETTE[3]
    assert colorize(np.array([[7]]), PALETTE, ignore_index=7).tolist() == [[[0, 0, 0]]]
    with pytest.raises(ValueError, match='label 4'):
        colorize(np.array([[0, 4]]), PALETTE)


def test_amplified_perturbation():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.1, 0.9, (4, 5, 3)).astype(np.float32)
    eps = 8.0
    np.testing.assert_allclose(amplified_perturbation(image, image, eps), 0.5)
    np.testing.assert_allclose(
        amplified_perturbation(image, image + eps / 255, eps), 1.0, atol=1e-5
    )
    np.testing.assert_allclose(
        amplified_perturbation(image, image - eps / 255, eps), 0.0, atol=1e-5
    )
    half = amplified_perturbation(image, image + eps / 255 / 2, eps)
    np.testing.assert_allclose(half, 0.75, atol=1e-5)
    # clipped beyond the radius, no division by zero at eps 0
    assert amplified_perturbation(image, image + 0.5, eps).max() == 1.0
    np.testing.assert_array_equal(amplified_perturbation(image, image + 0.1, 0), 0.5)


def _example(
    rng,
    name='img_0',
    eps=8.0,
    size=(24, 32),
    label_size=(12, 16),
    clean_acc=0.9,
    adv_acc=0.03,
):
    image = rng.uniform(0, 1, size + (3,)).astype(np.float32)
    delta = rng.uniform(-eps / 255, eps / 255, image.shape).astype(np.float32)
    adv = np.clip(image + delta, 0, 1).astype(np.float32)
    gt = rng.integers(0, len(PALETTE), label_size)
    gt[0, :3] = 255
    return dict(
        name=name,
        image=image,
        adv_image=adv,
        gt=gt,
        clean_pred=rng.integers(0, len(PALETTE), label_size),
        adv_pred=rng.integers(0, len(PALETTE), label_size),
        eps=eps,
        attack='APGD-Mask-CE',
        clean_acc=clean_acc,
        adv_acc=adv_acc,
    )


def test_save_load_example_round_trip(tmp_path):
    ex = _example(np.random.default_rng(0))
    path = save_example(ex, str(tmp_path / 'ex' / 'img_0'))
    assert path.endswith('.npz') and osp.isfile(path)
    back = load_example(path)
    assert set(back) == set(ex)
    for key in ('image', 'adv_image', 'gt', 'clean_pred', 'adv_pred'):
        assert back[key].dtype == ex[key].dtype
        np.testing.assert_array_equal(back[key], ex[key])
    for key in ('eps', 'clean_acc', 'adv_acc'):
        assert type(back[key]) is float and back[key] == ex[key]
    for key in ('name', 'attack'):
        assert type(back[key]) is str and back[key] == ex[key]
    assert np.abs(back['adv_image'] - back['image']).max() <= 8 / 255 + 1e-6
    with pytest.raises(ValueError, match='adv_pred'):
        save_example(
            {k: v for k, v in ex.items() if k != 'adv_pred'}, str(tmp_path / 'bad.npz')
        )


def test_grid_titles(tmp_path):
    rng = np.random.default_rng(0)
    examples = [
        _example(rng, 'frankfurt_0001'),
        _example(rng, 'lindau_0002', eps=4.0, clean_acc=0.5, adv_acc=0.25),
    ]
    fig = _grid_figure(
        examples,
        PALETTE,
        title='SEA examples',
        class_names=['road', 'sidewalk', 'building', 'wall'],
    )
    assert len(fig.axes) == 12
    row0 = [ax.get_title() for ax in fig.axes[:6]]
    assert row0 == [
        'clean image',
        'adversarial (ε=8/255)',
        'perturbation ×15.9',
        'ground truth',
        f'clean prediction\nmIoU {_miou_text(examples[0], "clean_pred")}, acc 90%',
        f'adversarial prediction\nmIoU {_miou_text(examples[0], "adv_pred")}, acc 3%',
    ]
    row1 = [ax.get_title() for ax in fig.axes[6:]]
    assert row1[1] == 'adversarial (ε=4/255)' and row1[2] == 'perturbation ×31.9'
    assert row1[4].endswith(', acc 50%') and row1[5].endswith(', acc 25%')
    # the key says what the perturbation's colours mean
    assert PERTURBATION_KEY in [t.get_text() for t in fig.texts]
    assert 'grey = pixel unchanged' in PERTURBATION_KEY
    assert 'frankfurt_0001' in fig.axes[0].get_ylabel()
    assert 'lindau_0002' in fig.axes[6].get_ylabel()
    assert fig._suptitle.get_text() == 'SEA examples'
    # label maps are not smoothed and the colour key names the classes
    assert fig.axes[3].get_images()[0].get_interpolation() == 'nearest'
    legend_texts = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert legend_texts == ['road', 'sidewalk', 'building', 'wall']


def _miou_text(example, key):
    """Per-image mIoU (%) from a confusion matrix, independent of image_miou."""
    gt, pred = np.asarray(example['gt']), np.asarray(example[key])
    valid = gt != 255
    k = len(PALETTE)
    conf = np.bincount(gt[valid] * k + pred[valid], minlength=k * k).reshape(k, k)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    return f'{100 * np.mean(inter[union > 0] / union[union > 0]):.0f}%'


def test_image_miou_shows_an_object_predicted_as_another_class():
    # 80 % background, one object of class 1 predicted as class 2: pixel
    # accuracy 80 %, but the IoU of classes 1 and 2 is 0 -> mIoU 1/3
    gt = np.zeros((10, 10), dtype=np.int64)
    gt[:2] = 1
    pred = gt.copy()
    pred[:2] = 2
    assert (gt == pred).mean() == pytest.approx(0.8)
    assert image_miou(gt, pred) == pytest.approx(1 / 3)
    assert image_miou(gt, gt) == 1.0
    # ignored pixels count for nothing; an image without any is NaN
    gt_ign = gt.copy()
    gt_ign[:2] = 255
    assert image_miou(gt_ign, pred) == 1.0
    assert np.isnan(image_miou(np.full((2, 2), 255), np.zeros((2, 2), int)))
    with pytest.raises(ValueError, match='same shape'):
        image_miou(gt, pred[:5])


def test_grid_titles_give_miou_beside_accuracy():
    gt = np.zeros((10, 10), dtype=np.int64)
    gt[:2] = 1
    pred = gt.copy()
    pred[:2] = 2
    image = np.full((10, 10, 3), 0.5, dtype=np.float32)
    example = dict(
        name='img',
        image=image,
        adv_image=image + 4 / 255,
        gt=gt,
        clean_pred=gt,
        adv_pred=pred,
        eps=4.0,
        attack='SEA',
        clean_acc=1.0,
        adv_acc=0.8,
    )
    titles = [ax.get_title() for ax in _grid_figure([example], PALETTE).axes]
    assert titles[4] == 'clean prediction\nmIoU 100%, acc 100%'
    assert titles[5] == 'adversarial prediction\nmIoU 33%, acc 80%'


def test_save_picture_grid_height_grows(tmp_path):
    rng = np.random.default_rng(1)
    examples = [_example(rng, f'img_{i}') for i in range(3)]
    one = save_picture_grid(examples[:1], str(tmp_path / 'one.png'), PALETTE)
    three = save_picture_grid(
        examples, str(tmp_path / 'g' / 'three.png'), PALETTE, title='three'
    )
    assert three == str(tmp_path / 'g' / 'three.png')
    img1, img3 = _check_png(one), _check_png(three)
    assert img1.shape[1] == img3.shape[1]
    assert img3.shape[0] > 2.5 * img1.shape[0]
    with pytest.raises(ValueError, match='label 9'):
        bad = dict(examples[0], adv_pred=np.full((12, 16), 9))
        save_picture_grid([bad], str(tmp_path / 'bad.png'), PALETTE)


def test_results_file_round_trip_and_old_schemas_refused(results, tmp_path):
    """One schema: what write_results writes, load_results reads back; a file
    of schema version 1 (fractions, written by development versions before
    0.1.0) or of a newer version is refused with the fix."""
    from mmseg_robust.evaluation.results import (
        SCHEMA_VERSION,
        RobustnessResults,
        load_results,
        write_results,
    )

    old = results[0]
    new = load_results(old)
    assert new.summary == old['summary']
    path = write_results(
        RobustnessResults(
            summary=new.summary,
            metrics=new.metrics,
            worst_case_modes=['best'],
            attacks=new.attacks,
            eps=new.eps,
            checkpoint=old['checkpoint'],
            timestamp='20261130_000000',
        ),
        str(tmp_path),
    )
    assert path.endswith('robustness_20261130_000000.json')
    written = json.loads(open(path).read())
    assert written['schema_version'] == SCHEMA_VERSION
    assert written['unit'] == 'percent' and 'images' not in written
    assert load_result(path) == load_result(old)
    written['schema_version'] = SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match='upgrade'):
        load_results(written)
    for version in (None, 1):
        first = dict(old, schema_version=version)
        if version is None:
            del first['schema_version']
        with pytest.raises(ValueError, match='schema version 1.*evaluate again'):
            load_results(first)
