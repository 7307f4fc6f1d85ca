"""The robustness evaluation's result cache: what its key covers (the package's
code, the data files read, the batches in reference mode), validation of its
lines on reading, the resume log; the results file never overwrites another
run's; out-of-range training labels in SEA's class weights are reported."""

import glob
import json
import os
import os.path as osp
import shutil

import numpy as np
import pytest
import torch

from mmseg_robust.engine.result_cache import (
    ResultCache,
    _checksum,
    data_stamp,
    source_digest,
)
from mmseg_robust.evaluation import counts_of_batch, image_record

# ----------------------------------------------------------------- unit level


def _record(key, seed=0, num_classes=3):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, num_classes, (1, 4, 4), generator=g)
    pred = torch.randint(0, num_classes, (1, 4, 4), generator=g)
    (clean,) = counts_of_batch(label, label, num_classes, 255)
    (adv,) = counts_of_batch(pred, label, num_classes, 255)
    return image_record(key, num_classes, clean, {'8': {'PGD': adv}})


def test_invalid_lines_are_ignored_naming_file_line_and_image(tmp_path):
    folder = str(tmp_path / 'cache')
    cache = ResultCache(folder)
    good, edited = _record('a.png', 0), _record('b.png', 1)
    cache.put([good, edited])
    path = cache.path
    lines = open(path).read().splitlines(keepends=True)
    assert len(lines) == 2
    # b.png: a hand-edited count, checksum made to match: the counts disagree
    bad = json.loads(lines[1])
    counts = bad['attacks']['8']['PGD']
    counts['intersect'][0] += 1
    bad['sum'] = _checksum(bad)
    # a.png copy edited without updating the checksum
    tampered = json.loads(lines[0])
    tampered['key'] = 'c.png'
    with open(path, 'w') as f:
        f.write(lines[0])
        f.write('null\n')
        f.write('{}\n')
        f.write(json.dumps(bad) + '\n')
        f.write(json.dumps(tampered) + '\n')
        f.write('{"key": "d.png", "unit": ')  # a kill: ignored silently
    with pytest.warns(UserWarning) as caught:
        reopened = ResultCache(folder)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 4, messages
    assert all(path in m and 'computed again' in m for m in messages)
    assert 'line 2' in messages[0] and 'not a record' in messages[0]
    assert 'line 3' in messages[1] and 'no image key' in messages[1]
    assert 'line 4' in messages[2] and 'image b.png' in messages[2]
    assert 'sum(intersect)' in messages[2] and '!= correct' in messages[2]
    assert 'line 5' in messages[3] and 'checksum' in messages[3]
    assert 'image c.png' in messages[3]
    assert len(reopened.invalid) == 4
    assert reopened.get('a.png')['clean'] == good['clean']
    assert reopened.get('b.png') is None and reopened.get('c.png') is None
    assert len(reopened) == 1


def test_partly_done_counts_only_unfinished_images(tmp_path):
    """Units are written before their image's record: an image whose record
    is there is done, not partly done (rank files read in any order)."""
    folder = str(tmp_path / 'cache')
    counts = {k: {'PGD': _record(k)['clean']} for k in ('a.png', 'b.png')}
    ResultCache(folder, rank=1).put_units('8', 0, counts)
    ResultCache(folder, rank=0).put([_record('a.png')])
    cache = ResultCache(folder)
    assert len(cache) == 1
    assert cache.partly_done == 1
    assert list(cache.units) == ['b.png']


def test_records_are_matched_by_data_stamp(tmp_path):
    folder = str(tmp_path / 'cache')
    old, new = (
        dict(_record('a.png', 0), data='s1'),
        dict(_record('a.png', 1), data='s2'),
    )
    ResultCache(folder).put([old])
    ResultCache(folder, rank=1).put([new])
    cache = ResultCache(folder)
    assert cache.get('a.png', 's1')['attacks'] == old['attacks']
    assert cache.get('a.png', 's2')['attacks'] == new['attacks']
    assert cache.get('a.png', 's3') is None
    cache.put_units('8', 0, {'b.png': {'PGD': old['clean']}}, {'b.png': 's1'})
    assert cache.get_unit('b.png', '8', 0, 's1') is not None
    assert cache.get_unit('b.png', '8', 0, 's2') is None


def test_data_stamp_sees_a_file_rewritten_in_place(tmp_path):
    path = str(tmp_path / 'ann.png')
    with open(path, 'wb') as f:
        f.write(b'0123')
    before = os.stat(path).st_mtime_ns
    stat, content = data_stamp([path]), data_stamp([path], 'content')
    with open(path, 'wb') as f:  # same size, other bytes, a later mtime
        f.write(b'4567')
    os.utime(path, ns=(before + 10**9, before + 10**9))
    assert data_stamp([path]) != stat
    assert data_stamp([path], 'content') != content
    # the old mtime restored (cp -p): only the content digest sees it
    os.utime(path, ns=(before, before))
    assert data_stamp([path]) == stat
    assert data_stamp([path], 'content') != content
    assert data_stamp([str(tmp_path / 'gone.png')]) != stat
    with pytest.raises(ValueError, match='data_digest'):
        data_stamp([path], 'mtime')


def test_source_digest_covers_every_python_file(tmp_path):
    pkg = tmp_path / 'pkg'
    (pkg / 'attacks').mkdir(parents=True)
    (pkg / '__init__.py').write_text('')
    (pkg / 'attacks' / 'apgd.py').write_text('STEP = 2\n')
    first = source_digest.__wrapped__(str(pkg))
    (pkg / 'attacks' / '__pycache__').mkdir()
    (pkg / 'attacks' / '__pycache__' / 'apgd.cpython.pyc').write_bytes(b'x')
    (pkg / 'notes.txt').write_text('not code')
    assert source_digest.__wrapped__(str(pkg)) == first
    (pkg / 'attacks' / 'apgd.py').write_text('STEP = 3\n')
    assert source_digest.__wrapped__(str(pkg)) != first
    # computed once per process for the installed package
    assert source_digest() == source_digest()


def test_results_file_never_overwrites_another_runs(tmp_path):
    from mmseg_robust.evaluation import RobustnessResults, load_results, write_results

    def results(miou):
        return RobustnessResults(
            summary={'num_images': 1, 'clean': {'mIoU': miou}, 'eps': {}},
            metrics={'mIoU': miou},
            worst_case_modes=['best'],
            timestamp='20261206_080000',
        )

    first = write_results(results(10.0), str(tmp_path))
    second = write_results(results(20.0), str(tmp_path))
    third = write_results(results(30.0), str(tmp_path))
    assert osp.basename(first) == 'robustness_20261206_080000.json'
    assert osp.basename(second) == 'robustness_20261206_080000_2.json'
    assert osp.basename(third) == 'robustness_20261206_080000_3.json'
    got = [load_results(p).metrics['mIoU'] for p in (first, second, third)]
    assert got == [10.0, 20.0, 30.0]


def test_out_of_range_training_labels_are_reported(
    small_config, synthetic_root, recwarn
):
    from mmengine.config import Config

    from mmseg_robust.engine.presets import dataset_class_weights

    cfg = Config.fromfile(small_config)
    train = cfg.train_dataloader.dataset.to_dict()
    train.update(
        data_root=synthetic_root, generator_cfg=dict(splits=dict(train=48, val=16))
    )
    full = dataset_class_weights(train, 5)
    assert not [w for w in recwarn if 'class weights' in str(w.message)]
    assert len(full) == 5
    # with 3 classes, labels 3 and 4 count for no class: reported with counts
    from PIL import Image

    files = sorted(glob.glob(osp.join(synthetic_root, 'ann_dir', 'train', '*.png')))
    assert len(files) == 48
    labels = np.concatenate(
        [np.asarray(Image.open(p), dtype=np.int64).ravel() for p in files]
    )
    with pytest.warns(UserWarning, match='outside') as caught:
        weights = dataset_class_weights(train, 3)
    (message,) = [str(w.message) for w in caught if 'class weights' in str(w.message)]
    outside = labels[(labels >= 3) & (labels != 255)]
    assert outside.size > 0
    assert f'{outside.size} training label pixels' in message
    for value in np.unique(outside):
        assert f'{value}: {(outside == value).sum()}' in message
    assert 'num_classes' in message and 'label_map' in message
    assert len(weights) == 3 and abs(sum(weights) - 1) < 1e-6


# ------------------------------------------------------------------ end to end

EVAL = [
    'evaluator.eps=8',
    'evaluator.steps=1',
    'test_dataloader.dataset.indices=2',
]


@pytest.fixture
def own_data(synthetic_root, tmp_path):
    """A copy of the synthetic data this test may rewrite."""
    root = str(tmp_path / 'data')
    shutil.copytree(synthetic_root, root)
    return root


def _run(run_tool, config, ckpt, work, opts, env=None):
    out = run_tool(
        ['python', 'tools/test.py', config, ckpt, '--work-dir', work, '--cfg-options']
        + opts,
        env=env,
    )
    newest = max(glob.glob(osp.join(work, 'robustness_*.json')), key=osp.getmtime)
    with open(newest) as f:
        return json.load(f), out


def test_edited_package_code_is_computed_again(
    run_tool,
    repo_root,
    small_config,
    small_checkpoint,
    own_data,
    data_options,
    tmp_path,
):
    """Acceptance: the attack code edited in a copy of the package put first on
    the path, the same command with resume=True computes every image again."""
    work = str(tmp_path / 'work')
    opts = ['evaluator.type=PGD'] + EVAL + data_options(own_data)
    _, out = _run(run_tool, small_config, small_checkpoint, work, opts)
    assert '(2 attacked, 0 from cache)' in out
    # the same code from another place: the same fingerprint (a content digest)
    copy = tmp_path / 'copy'
    shutil.copytree(
        osp.join(repo_root, 'mmseg_robust'),
        copy / 'mmseg_robust',
        ignore=shutil.ignore_patterns('__pycache__'),
    )
    os.symlink(osp.join(repo_root, 'configs'), copy / 'configs')
    env = dict(PYTHONPATH=str(copy) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    _, out = _run(run_tool, small_config, small_checkpoint, work, opts, env)
    assert '(0 attacked, 2 from cache)' in out
    # an edit of the attack code: every image computed again, in a new folder
    pgd = copy / 'mmseg_robust' / 'attacks' / 'pgd.py'
    pgd.write_text(pgd.read_text() + '\n# an edit\n')
    _, out = _run(run_tool, small_config, small_checkpoint, work, opts, env)
    assert '(2 attacked, 0 from cache)' in out
    metas = [
        json.load(open(p))
        for p in glob.glob(osp.join(work, 'robustness_cache', '*', 'meta.json'))
    ]
    assert len(metas) == 2
    digests = {m['code'] for m in metas}
    assert source_digest.__wrapped__(str(copy / 'mmseg_robust')) in digests
    assert source_digest() in digests
    assert all(m['torch'] == torch.__version__ and m['device'] == 'cpu' for m in metas)


def test_rewritten_annotations_invalid_lines_and_the_resume_log(
    run_tool, small_config, small_checkpoint, own_data, data_options, tmp_path
):
    work = str(tmp_path / 'work')
    opts = ['evaluator.type=PGD', 'test_dataloader.batch_size=2'] + EVAL
    opts += data_options(own_data)
    first, out = _run(run_tool, small_config, small_checkpoint, work, opts)
    assert '(2 attacked, 0 from cache)' in out
    (cache,) = glob.glob(osp.join(work, 'robustness_cache', '*', 'rank0.jsonl'))
    lines = open(cache).read().splitlines(keepends=True)
    units = [line for line in lines if '"unit"' in line]
    records = [line for line in lines if '"unit"' not in line]
    assert len(units) == 2 and len(records) == 2
    keys = [json.loads(line)['key'] for line in records]

    # (c) null, {} and a record with inconsistent counts: warned about by file
    # and line, the edited image computed again, the other one read
    edited = json.loads(records[0])
    edited['attacks']['8']['PGD-CE']['correct'] += 1
    with open(cache, 'w') as f:
        f.write('null\n{}\n' + json.dumps(edited) + '\n' + records[1])
    again, out = _run(run_tool, small_config, small_checkpoint, work, opts)
    assert f'{cache}, line 1: invalid robustness cache line' in out
    assert f'{cache}, line 2' in out
    assert f'{cache}, line 3' in out and f'for image {keys[0]}' in out
    assert '(1 attacked, 1 from cache)' in out
    assert again['summary'] == first['summary']

    # (e) the resume log: image 0 interrupted after its attack's unit, image 1
    # done (its unit and its record): 1 done, 1 partly done
    with open(cache, 'w') as f:
        f.writelines(units)  # one unit per image (one attack, one eps)
        f.write(records[1])
    _, out = _run(run_tool, small_config, small_checkpoint, work, opts)
    assert '1 images already done, 1 partly done' in out

    # (f) an annotation rewritten in place under the same path: that image is
    # computed again (clean numbers from the new labels), the other one read
    ann = json.loads(records[0])['key'].replace('img_dir', 'ann_dir')
    assert osp.isfile(ann)
    from PIL import Image

    label = np.asarray(Image.open(ann))
    Image.fromarray(np.zeros_like(label)).save(ann)
    rewritten, out = _run(run_tool, small_config, small_checkpoint, work, opts)
    assert '(1 attacked, 1 from cache)' in out
    assert rewritten['summary']['clean'] != first['summary']['clean']
    fresh, out = _run(
        run_tool,
        small_config,
        small_checkpoint,
        str(tmp_path / 'fresh'),
        opts + ['evaluator.resume=False'],
    )
    assert fresh['summary'] == rewritten['summary']


def test_batch_size_is_in_the_key_in_reference_mode(
    run_tool,
    small_config,
    small_checkpoint,
    synthetic_root,
    data_options,
    tmp_path,
    repo_root,
):
    """compat='reference' stops a batch once all its images are at accuracy 0:
    another test batch size is another evaluation. The default APGD attacks
    each image alike in any batch: its records are shared. A speed option of
    the passes (evaluator.speedups) is another evaluation."""
    work = str(tmp_path / 'work')
    base = ['evaluator.type=APGD', 'evaluator.steps=2', 'evaluator.eps=8']
    base += ['test_dataloader.dataset.indices=2'] + data_options(synthetic_root)
    runs = []
    for compat in ('reference', 'default'):
        for batch in (2, 1, 2):
            runs += [
                ':::',
                'tools/test.py',
                small_config,
                small_checkpoint,
                '--work-dir',
                work,
                '--cfg-options',
                f'evaluator.compat={compat}',
                f'test_dataloader.batch_size={batch}',
            ] + base
    # a speed option of the passes: another key (run through the loop, the
    # model's weights channels-last during the attack only)
    runs += [':::', 'tools/test.py', small_config, small_checkpoint, '--work-dir']
    runs += [work, '--cfg-options', 'evaluator.speedups=channels_last'] + base
    out = run_tool(
        ['python', 'tests/tools_in_one_process.py'] + runs[1:], cwd=repo_root
    )
    done = [
        line.split('images done on this rank: ')[1].split(')')[0]
        for line in out.splitlines()
        if 'images done on this rank: 2 ' in line
    ]
    assert done == [
        '2 (2 attacked, 0 from cache',  # reference, batch size 2
        '2 (2 attacked, 0 from cache',  # reference, batch size 1: not reused
        '2 (0 attacked, 2 from cache',  # reference, batch size 2 again
        '2 (2 attacked, 0 from cache',  # default mode: another attack
        '2 (0 attacked, 2 from cache',  # default, batch size 1: reused
        '2 (0 attacked, 2 from cache',
        '2 (2 attacked, 0 from cache',  # channels_last: not the fp32 records
    ], out[-4000:]
    metas = [
        json.load(open(p))
        for p in glob.glob(osp.join(work, 'robustness_cache', '*', 'meta.json'))
    ]
    assert [m['speedups'] for m in metas if 'speedups' in m] == [['channels_last']]
    batches = sorted(str(m.get('batches')) for m in metas)
    assert batches == [
        'None',
        'None',
        "{'batch_size': 1, 'world_size': 1}",
        "{'batch_size': 2, 'world_size': 1}",
    ]


def test_description_covers_init_checkpoints_modes_and_batches(tmp_path):
    """The key holds the init_cfg checkpoint's content when nothing is loaded
    over it, the built attacks' resolved modes, the batch size and world
    size only for a batch-dependent attack, and the passes' speed options."""
    import types

    from mmengine.config import Config

    from mmseg_robust.engine.result_cache import describe_evaluation, fingerprint
    from mmseg_robust.registry import ATTACKS

    pretrained = tmp_path / 'backbone.pth'
    torch.save({'w': torch.ones(2)}, pretrained)
    cfg = Config(
        dict(
            model=dict(
                type='EncoderDecoder',
                backbone=dict(
                    type='ResNet',
                    init_cfg=dict(type='Pretrained', checkpoint=str(pretrained)),
                ),
            ),
            test_dataloader=dict(dataset=dict(type='X', indices=4)),
        )
    )
    model = torch.nn.Linear(2, 2)
    loader = types.SimpleNamespace(batch_size=4)

    def describe(load_from=None, speedups=(), **attack):
        attacks = {'8': [ATTACKS.build(dict(type='APGD', eps=8, steps=2, **attack))]}
        return describe_evaluation(
            cfg,
            load_from,
            model,
            loader,
            [dict(type='APGD')],
            attacks,
            0,
            speedups=speedups,
        )

    base = describe()
    assert base['init_checkpoints'][0]['size'] == osp.getsize(pretrained)
    assert base['code'] == source_digest() and base['device'] == 'cpu'
    assert base['torch'] == torch.__version__ and 'indices' not in base['dataset']
    assert "zero_acc='leave'" in base['built_attacks']['8'][0]
    assert 'batches' not in base
    # the pretrained file rewritten: another key; a loaded checkpoint replaces it
    torch.save({'w': torch.zeros(2)}, pretrained)
    assert fingerprint(describe()) != fingerprint(base)
    loaded = describe(load_from=str(pretrained))
    assert 'init_checkpoints' not in loaded
    assert loaded['checkpoint']['blake2b']
    # the reference's batch-level stop: batch size and world size in the key
    ref = describe(compat='reference')
    assert "zero_acc='reference'" in ref['built_attacks']['8'][0]
    assert ref['batches'] == dict(batch_size=4, world_size=1)
    assert 'batches' not in describe(compat='reference', early_stop=False)
    # the speed options of the passes: each set its own key (fp32 and bf16
    # results never mixed); none on: the key of a plain run
    keys = {
        fingerprint(describe(speedups=s))
        for s in ((), ('channels_last',), ('compile',), ('bf16',), ('compile', 'bf16'))
    }
    assert len(keys) == 5 and 'speedups' not in base


def test_a_line_cut_by_a_kill_is_dropped_not_warned_about(tmp_path, recwarn):
    folder = str(tmp_path / 'cache')
    ResultCache(folder).put([_record('a.png', 0)])
    path = osp.join(folder, 'rank0.jsonl')
    with open(path, 'a') as f:
        f.write('{"key":"b.png","num_cla')  # killed while writing
    cache = ResultCache(folder)  # the resumed run
    cache.put([_record('b.png', 1)])
    reopened = ResultCache(folder)  # a later run
    assert sorted(reopened.records) == ['a.png', 'b.png']
    assert not reopened.invalid and not [w for w in recwarn if 'cache' in str(w)]
    assert open(path).read().count('\n') == 2


def test_data_digest_option(small_config):
    from mmengine.config import Config

    from mmseg_robust.engine import apply_robustness_evaluator

    cfg = apply_robustness_evaluator(
        Config.fromfile(small_config), dict(type='PGD', data_digest='content')
    )
    assert cfg.test_cfg.data_digest == 'content'
    cfg = apply_robustness_evaluator(Config.fromfile(small_config), 'PGD')
    assert 'data_digest' not in cfg.test_cfg  # the loop's default: 'stat'
    with pytest.raises(ValueError, match=r"data_digest must be one of \('stat'"):
        apply_robustness_evaluator(
            Config.fromfile(small_config), dict(type='PGD', data_digest='mtime')
        )


def test_the_budget_is_kept_and_checked(tmp_path):
    """A record's pass counts (docs/algorithms.md section 3.6) come back as
    written; a hand-edited negative count makes the line invalid."""
    folder = str(tmp_path / 'cache')
    cache = ResultCache(folder)
    good, edited = _record('a.png', 0), _record('b.png', 1)
    good['attacks']['8']['PGD'].update(passes=10, forwards=1)
    edited['attacks']['8']['PGD'].update(passes=-3, forwards=1)
    edited['sum'] = _checksum(edited)
    cache.put([good, edited])
    with pytest.warns(UserWarning, match='passes=-3 is not a count'):
        reopened = ResultCache(folder)
    assert reopened.get('a.png')['attacks']['8']['PGD']['passes'] == 10
    assert reopened.get('b.png') is None
