"""benchmarks/frontier.py on a tiny checkpoint: the results' fields, the passes
against the attacks' budgets, the worst case over a method's attacks, resuming,
and the preset bars."""

import importlib.util
import json
import os.path as osp

import numpy as np
import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = 'configs/synthetic/upernet_convnext-micro_synthetic.py'
SCALE = 4 / 300  # 4 iterations per attack: APGD's stages of 1, 1 and 2

pytestmark = pytest.mark.usefixtures('one_thread')


def _frontier():
    spec = importlib.util.spec_from_file_location(
        'frontier', osp.join(REPO, 'benchmarks', 'frontier.py')
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cfg_options(options):
    """The ``data_options`` fixture's --cfg-options as a dict."""
    out = {}
    for opt in options:
        key, value = opt.split('=', 1)
        out[key] = int(value) if value.isdigit() else value
    return out


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    """The small config's model, seeded random weights, saved as a plain
    ``{'state_dict'}`` (loadable with ``weights_only=True``)."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import mmseg_robust  # noqa: F401
    from mmseg_robust.registry import MODELS

    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(osp.join(REPO, CONFIG)).model)
    path = str(tmp_path_factory.mktemp('frontier') / 'tiny.pth')
    torch.save({'state_dict': model.state_dict()}, path)
    return path


def _run(frontier, ckpt, options, state, methods, log=None):
    return frontier.run_benchmark(
        {'tiny': dict(config=CONFIG, checkpoint=ckpt)},
        methods,
        eps=[8],
        seeds=[0],
        images=2,
        state_dir=state,
        steps_scale=SCALE,
        batch=2,
        cfg_options=_cfg_options(options),
        log=log or (lambda msg: None),
    )


def test_frontier_passes_worst_case_outputs_and_resume(
    tiny_checkpoint, synthetic_root, data_options, tmp_path, monkeypatch
):
    frontier = _frontier()
    options = data_options(synthetic_root)
    state = str(tmp_path / 'state')
    ran = []
    results = _run(
        frontier, tiny_checkpoint, options, state, ['JS-Avg', 'SEA'], ran.append
    )
    by_method = {r['method']: r for r in results}
    assert sorted(by_method) == ['JS-Avg', 'SEA']
    # SEA's members ran once each; JS-Avg alone is SEA's JS-Avg unit
    assert sum('...' in line for line in ran) == 3
    units = {
        json.loads(u['id'])[2]: u
        for u in map(json.loads, open(osp.join(state, 'units.jsonl')))
    }
    assert sorted(units) == ['JS-Avg', 'Mask-CE', 'Mask-CE-Bal']
    for name, unit in units.items():
        assert unit['steps'] == 4 and unit['config']['steps'] == 4
        assert unit['config']['type'] == 'APGDLargeEps'
        for rec in unit['records']:
            counts = rec['attacks']['8'][name]
            # APGD with T steps: at most T forward+backward passes per image
            assert 0 < counts['passes'] <= 4
            assert counts['forwards'] >= 1
    # a method's passes: per image the sum over its attacks, mean over images
    for method, r in by_method.items():
        names = frontier.METHODS[method]
        per_image = [
            sum(units[n]['records'][i]['attacks']['8'][n]['passes'] for n in names)
            for i in range(2)
        ]
        assert r['passes'] == pytest.approx(np.mean(per_image))
        assert r['passes_max'] <= 4 * len(names)
        assert r['images'] == 2 and r['steps'] == {n: 4 for n in names}
    assert by_method['JS-Avg']['passes'] == pytest.approx(
        units['JS-Avg']['records'][0]['attacks']['8']['JS-Avg']['passes'] / 2
        + units['JS-Avg']['records'][1]['attacks']['8']['JS-Avg']['passes'] / 2
    )
    # SEA's aACC: per image the lowest accuracy over its members, mean over images
    accs = [
        [
            c['correct'] / c['valid']
            for c in (units[n]['records'][i]['attacks']['8'][n] for n in units)
        ]
        for i in range(2)
    ]
    sea = by_method['SEA']
    assert sea['aACC'] == pytest.approx(100 * np.mean([min(a) for a in accs]))
    assert sea['aACC'] <= by_method['JS-Avg']['aACC'] + 1e-9
    # the greedy starts from the first attack (Mask-CE-Bal) and only lowers it
    assert sea['mIoU'] <= sea['attacks']['Mask-CE-Bal'] + 1e-9

    # resume: nothing runs again; a new method made of finished units runs no
    # attack either
    def refuse(*args, **kwargs):
        raise AssertionError('a finished unit ran again')

    monkeypatch.setattr(frontier, 'run_unit', refuse)
    again = _run(
        frontier,
        tiny_checkpoint,
        options,
        state,
        ['JS-Avg', 'SEA', 'Mask-CE-Bal+JS-Avg'],
    )
    assert again[:2] == results
    pair = again[2]
    assert pair['passes'] == pytest.approx(
        by_method['JS-Avg']['passes']
        + np.mean(
            [
                units['Mask-CE-Bal']['records'][i]['attacks']['8']['Mask-CE-Bal'][
                    'passes'
                ]
                for i in range(2)
            ]
        )
    )
    assert len(open(osp.join(state, 'results.jsonl')).readlines()) == 3

    # the outputs: JSON fields, table, plot
    out = str(tmp_path / 'out' / 'frontier.json')
    doc = frontier.write_outputs(
        again,
        dict(methods=['JS-Avg', 'SEA', 'Mask-CE-Bal+JS-Avg'], eps=[8], seeds=[0]),
        out,
        clean_models=[],
        command='python benchmarks/frontier.py (test)',
    )
    saved = json.load(open(out))
    assert saved == json.loads(json.dumps(doc))
    for key in ('command', 'date', 'machine', 'versions', 'settings', 'results'):
        assert saved[key], key
    assert saved['methods']['SEA'] == ['Mask-CE-Bal', 'Mask-CE', 'JS-Avg']
    assert len(saved['results']) == 3 and len(saved['aggregates']) == 3
    assert {b['method'] for b in saved['presets']} == {'JS-Avg', 'Mask-CE-Bal+JS-Avg'}
    table = open(out[:-5] + '.md').read()
    assert '| tiny | 8 | SEA | 1 |' in table
    assert osp.getsize(out[:-5] + '.png') > 0


def _row(model, method, miou, aacc, passes, std=0.1):
    return dict(
        model=model,
        method=method,
        budget=1.0,
        eps=8.0,
        mIoU=miou,
        aACC=aacc,
        passes=passes,
        mIoU_std=std,
        aACC_std=std,
    )


def test_refining_sea_is_one_unit_and_its_passes_sum_its_members(
    tiny_checkpoint, synthetic_root, data_options, tmp_path
):
    """An ensemble unit (SEA with a refinement, docs/algorithms.md 4.1): one
    run; the method's passes per image are the sum over the unit's members,
    the refinement included, and its aACC the per-image worst case over them."""
    frontier = _frontier()
    state = str(tmp_path / 'state')
    (r,) = _run(
        frontier,
        tiny_checkpoint,
        data_options(synthetic_root),
        state,
        ['SEA-R120'],
    )
    (unit,) = map(json.loads, open(osp.join(state, 'units.jsonl')))
    # 120 and 90 iterations at budget 1, scaled to 4/300: 2 and 1
    assert unit['config']['type'] == 'SEA'
    assert (unit['config']['steps'], unit['config']['refine_steps']) == (2, 1)
    names = ['APGD-Mask-CE-Bal', 'APGD-Mask-CE', 'APGD-JS-Avg', 'Refine']
    names = [f'SEA-R120:{n}' for n in names]
    counts = [rec['attacks']['8'] for rec in unit['records']]
    assert all(list(c) == names for c in counts)
    per_image = [sum(c[n]['passes'] for n in names) for c in counts]
    assert r['passes'] == pytest.approx(np.mean(per_image))
    assert 0 < r['passes'] <= 3 * 2 + 1
    assert all(c[names[-1]]['passes'] <= 1 for c in counts)
    acc = [min(c[n]['correct'] / c[n]['valid'] for n in names) for c in counts]
    assert r['aACC'] == pytest.approx(100 * np.mean(acc))


def test_preset_bars():
    frontier = _frontier()
    sea = [_row('clean', 'SEA', 10, 20, 900), _row('robust', 'SEA', 30, 60, 900)]
    rows = sea + [
        # 0.6 lower in mIoU on the robust model, equal passes, clean 0.05 worse
        _row('clean', 'A', 10.05, 20, 900),
        _row('robust', 'A', 29.4, 60.05, 900),
        # as A but the clean model 0.2 worse: beyond the 0.1 spread
        _row('clean', 'B', 10.2, 20, 900),
        _row('robust', 'B', 29.4, 60.05, 900),
        # half the passes, within 0.3 everywhere
        _row('clean', 'C', 10.25, 20.1, 450),
        _row('robust', 'C', 30.25, 59, 450),
        # half the passes plus one
        _row('clean', 'D', 10, 20, 451),
        _row('robust', 'D', 30, 60, 451),
    ]
    bars = {
        b['method']: b
        for b in frontier.preset_bars(rows, ['clean'], candidates=('A', 'B', 'C', 'D'))
    }
    assert (bars['A']['stronger'], bars['A']['cheaper']) == (True, False)
    assert (bars['B']['stronger'], bars['B']['cheaper']) == (False, False)
    assert (bars['C']['stronger'], bars['C']['cheaper']) == (False, True)
    assert (bars['D']['stronger'], bars['D']['cheaper']) == (False, False)
    assert bars['C']['max_passes_ratio'] == 0.5


def test_sea_members_alone_are_configured_as_in_sea():
    """A method made of SEA's members is SEA: each unit builds the attack SEA
    builds for that member (up to its name and random starts)."""
    from mmseg_robust.attacks import SEA
    from mmseg_robust.registry import ATTACKS

    frontier = _frontier()
    weights = [0.1, 0.2, 0.3, 0.2, 0.2]
    sea = SEA(eps=8, steps=300, class_weights=weights, eps_units='255')
    assert frontier.METHODS['SEA'] == [
        name[len('APGD-') :] for name in sea.record_names()
    ]
    for name, member in zip(frontier.METHODS['SEA'], sea.attacks.values()):
        cfg = frontier.unit_config(name, 1.0, weights)
        alone = ATTACKS.build(dict(cfg, eps=8, eps_units='255'))
        assert type(alone) is type(member)
        assert repr(alone.objective) == repr(member.objective)
        for key, value in vars(member).items():
            if key not in ('objective', 'name', '_name'):
                assert repr(getattr(alone, key)) == repr(value), key
    assert frontier.unit_config('JS-Avg', 0.5)['steps'] == 150
    assert frontier.unit_seed(0, 'JS-Avg') != frontier.unit_seed(0, 'Mask-CE')
    assert frontier.unit_seed(1, 'JS-Avg') != frontier.unit_seed(0, 'JS-Avg')


def test_discover_models(tmp_path):
    """The demo's checkpoints where tools/demo.py writes them, the trained
    models' list, and --model entries (which win)."""
    frontier = _frontier()

    def touch(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b'')
        return str(path)

    root, demo = tmp_path / 'work_dirs', tmp_path / 'demo'
    clean = touch(root / 'upernet_convnext-micro_synthetic' / 'iter_1000.pth')
    touch(demo / 'train' / 'PIR-AT-20it' / 'iter_20.pth')
    pirat = touch(demo / 'train' / 'PIR-AT-40it' / 'iter_40.pth')
    seg = touch(tmp_path / 'seg.pth')
    listed = tmp_path / 'models.json'
    listed.write_text(
        json.dumps(
            {
                'SegFormer-PIR-AT': dict(config='c.py', checkpoint=seg),
                'DeepLabV3+-PIR-AT': dict(config='d.py', checkpoint='/missing.pth'),
            }
        )
    )
    found = frontier.discover_models(
        str(demo), str(root), str(listed), ['SAT=s.py:/x/s.pth']
    )
    assert list(found) == ['clean', 'PIR-AT', 'SegFormer-PIR-AT', 'SAT']
    assert found['clean']['checkpoint'] == clean
    assert found['PIR-AT']['checkpoint'] == pirat  # the longest training
    assert found['SAT'] == dict(config='s.py', checkpoint='/x/s.pth')
    with pytest.raises(SystemExit, match='NAME=CONFIG:CHECKPOINT'):
        frontier.discover_models(None, str(root), None, ['SAT'])


def test_a_unit_with_its_miou_candidates_reruns_the_unit():
    """``<unit>+mIoU-iterates`` is the unit's own attack, from its own random
    starts, with the mIoU candidates added (docs/algorithms.md 4.2): a paired
    comparison."""
    frontier = _frontier()
    suffix = frontier.WITH_CANDIDATES
    weights = [0.25] * 4
    for unit in ('Mask-CE-Bal', 'JS-Avg', 'SEA2-R150', 'SEA2-R300'):
        assert frontier.unit_seed(2, unit + suffix) == frontier.unit_seed(2, unit)
        plain = frontier.unit_config(unit, 0.5, weights)
        cfg = frontier.unit_config(unit + suffix, 0.5, weights)
        key = 'miou_candidates' if unit.startswith('SEA') else 'miou_candidate'
        assert cfg.pop(key) is True and cfg == plain
    assert frontier.METHODS['SEA' + suffix] == [
        m + suffix for m in frontier.METHODS['SEA']
    ]


def test_paired_differences_of_the_miou_candidates():
    """Per seed, the method with its candidates minus the method on the same
    model, budget and eps; then mean and spread over the seeds."""
    frontier = _frontier()
    method = 'SEA' + frontier.WITH_CANDIDATES

    def res(name, seed, miou, aacc, model='m', e=8.0):
        return dict(
            model=model, method=name, budget=1.0, eps=e, seed=seed,
            mIoU=miou, aACC=aacc, passes=900.0,
        )  # fmt: skip

    results = [
        res('SEA', 0, 30.0, 70.0),
        res('SEA', 1, 31.0, 71.0),
        res(method, 0, 29.5, 70.0),
        res(method, 1, 30.0, 71.0),
        res(method, 2, 10.0, 10.0),  # no SEA result of seed 2: left out
        res(method, 0, 5.0, 5.0, e=4.0),  # nor at eps 4
    ]
    (row,) = frontier.paired_differences(results)
    assert (row['model'], row['method'], row['base'], row['eps']) == (
        'm',
        method,
        'SEA',
        8.0,
    )
    assert row['seeds'] == 2 and row['mIoU'] == -0.75 and row['aACC'] == 0.0
    assert abs(row['mIoU_std'] - 0.3535533905932738) < 1e-12
    assert row['passes'] == 0.0
    table = frontier.markdown([], [], [row])
    assert '| m | 8 | SEA+mIoU-iterates | SEA | 1 | -0.75 ± 0.35 | +0.00 ± 0.00 |' in (
        table
    )
    # SEA-U differs from SEA in Mask-CE-Bal's weights only
    assert frontier.paired_base('SEA-U') == 'SEA'
    assert frontier.METHODS['SEA-U'][1:] == frontier.METHODS['SEA'][1:]
    assert frontier.unit_seed(1, 'Mask-CE-Bal-U') == frontier.unit_seed(
        1, 'Mask-CE-Bal'
    )
    assert frontier.paired_base('SEA') is None
    assert frontier.paired_base('SEA2-R150' + frontier.WITH_CANDIDATES) == 'SEA2-R150'


def test_paired_methods_rerun_only_what_differs(
    tiny_checkpoint, synthetic_root, data_options, tmp_path
):
    """SEA-U runs one unit of its own (Mask-CE-Bal with the clean-union
    weights, from Mask-CE-Bal's random starts) and reads SEA's other two; a
    unit with its mIoU candidates records the unit's own outputs beside them."""
    from mmseg_robust.attacks.apgd import MIOU_CANDIDATE_SUFFIX

    frontier = _frontier()
    state = str(tmp_path / 'state')
    results = _run(
        frontier,
        tiny_checkpoint,
        data_options(synthetic_root),
        state,
        ['SEA', 'SEA-U', 'SEA' + frontier.WITH_CANDIDATES],
    )
    units = {
        json.loads(u['id'])[2]: u
        for u in map(json.loads, open(osp.join(state, 'units.jsonl')))
    }
    suffix = frontier.WITH_CANDIDATES
    assert sorted(units) == sorted(
        ['Mask-CE-Bal', 'Mask-CE', 'JS-Avg', 'Mask-CE-Bal-U']
        + [m + suffix for m in ('Mask-CE-Bal', 'Mask-CE', 'JS-Avg')]
    )
    # the weights: 1 / U_c of the clean predictions, summed over the images
    # (every unit records the clean counts), normalised
    union = np.sum([r['clean']['union'] for r in units['JS-Avg']['records']], 0)
    inv = np.where(union > 0, 1.0 / np.maximum(union, 1), 0.0)
    weights = units['Mask-CE-Bal-U']['config']['loss']['class_weights']
    assert weights == pytest.approx(list(inv / inv.sum()))
    assert weights != units['Mask-CE-Bal']['config']['loss']['class_weights']
    for name in ('Mask-CE-Bal', 'Mask-CE', 'JS-Avg'):
        for plain, cand in zip(units[name]['records'], units[name + suffix]['records']):
            at = cand['attacks']['8']
            assert list(at) == [name, name + MIOU_CANDIDATE_SUFFIX]
            assert at[name] == plain['attacks']['8'][name]
            assert at[name + MIOU_CANDIDATE_SUFFIX]['passes'] == 0
    by_method = {r['method']: r for r in results}
    assert by_method['SEA' + suffix]['aACC'] == by_method['SEA']['aACC']
    assert by_method['SEA' + suffix]['passes'] == by_method['SEA']['passes']
    paired = frontier.paired_differences(results)
    assert {(p['method'], p['base']) for p in paired} == {
        ('SEA' + suffix, 'SEA'),
        ('SEA-U', 'SEA'),
    }
