"""Robustness evaluation through the stock tools/test.py and dist_test.sh:
invariants, determinism, distributed == single process, resume == uninterrupted,
and clear errors."""

import glob
import json
import os
import os.path as osp

import pytest

N_IMAGES = 7  # odd: uneven last batch and uneven split over 2 ranks
SEA = [
    'evaluator.type=SEA',
    'evaluator.eps=0,2,8',
    'evaluator.steps=10',
    f'test_dataloader.dataset.indices={N_IMAGES}',
    'test_dataloader.batch_size=2',
]


@pytest.fixture(scope='module')
def checkpoint(run_tool, small_config, synthetic_root, data_options, tmp_path_factory):
    """The small model after a few iterations: weak but not random."""
    work = str(tmp_path_factory.mktemp('robust_ckpt'))
    run_tool(
        [
            'python',
            'tools/train.py',
            small_config,
            '--work-dir',
            work,
            '--cfg-options',
            'train_cfg.max_iters=150',
            'train_cfg.val_interval=150',
            'default_hooks.checkpoint.interval=150',
        ]
        + data_options(synthetic_root)
    )
    return osp.join(work, 'iter_150.pth')


def _test(run_tool, cfg, ckpt, work, opts, launcher=None, env=None):
    if launcher == 'dist':
        cmd = ['bash', 'tools/dist_test.sh', cfg, ckpt, '2']
    else:
        cmd = ['python', 'tools/test.py', cfg, ckpt]
    out = run_tool(cmd + ['--work-dir', work, '--cfg-options'] + opts, env=env)
    files = sorted(glob.glob(osp.join(work, 'robustness_*.json')))
    assert files, out[-3000:]
    with open(files[-1]) as f:
        return json.load(f), out


@pytest.fixture(scope='module')
def reference(
    run_tool, small_config, checkpoint, synthetic_root, data_options, tmp_path_factory
):
    work = str(tmp_path_factory.mktemp('sea_ref'))
    return _test(
        run_tool,
        small_config,
        checkpoint,
        work,
        SEA + ['evaluator.resume=False'] + data_options(synthetic_root),
    )


def test_invariants(reference):
    result, out = reference
    s = result['summary']
    assert s['num_images'] == N_IMAGES
    clean = s['clean']
    # eps = 0: every attack returns the clean images -> exactly the clean numbers
    zero = s['eps']['0']
    for r in zero['attacks'].values():
        assert r['mIoU'] == clean['mIoU'] and r['aAcc'] == clean['aAcc']
        assert r['aAcc_img'] == clean['aAcc_img']
    assert zero['worst_case']['aAcc_img'] == clean['aAcc_img']
    assert zero['worst_case']['mIoU'] == clean['mIoU']
    for eps in ('2', '8'):
        res = s['eps'][eps]
        worst = res['worst_case']
        assert set(res['attacks']) == {
            'APGD-Mask-CE-Bal',
            'APGD-Mask-CE',
            'APGD-JS-Avg',
        }
        for r in res['attacks'].values():
            # robust <= clean, worst case <= every single attack
            assert r['aAcc_img'] <= clean['aAcc_img']
            assert worst['aAcc_img'] <= r['aAcc_img']
            assert worst['mIoU'] <= r['mIoU'] + 1e-12
        assert worst['mIoU_best'] <= clean['mIoU']
    # non-increasing in eps at a fixed seed
    w = [s['eps'][e]['worst_case'] for e in ('0', '2', '8')]
    assert w[0]['aAcc_img'] >= w[1]['aAcc_img'] >= w[2]['aAcc_img']
    assert w[0]['mIoU'] >= w[1]['mIoU'] >= w[2]['mIoU']
    assert w[2]['aAcc_img'] < clean['aAcc_img'] - 10  # the attack does bite
    # one unit everywhere: percent (mmseg's convention), in the summary too
    assert result['unit'] == 'percent' and result['schema_version'] == 3
    assert result['metrics']['eps8/SEA/mIoU'] == round(w[2]['mIoU'], 2)
    assert result['metrics']['aAcc_img'] == round(clean['aAcc_img'], 2)
    assert result['attacks'] == [
        dict(type='SEA', steps=10, class_weights=result['attacks'][0]['class_weights'])
    ] and result['eps'] == [0, 2, 8]
    assert 'Robustness results written to' in out
    # warnings that do not apply to a robustness evaluation are gone
    assert 'prefix is not set' not in out and 'draw is False' not in out
    assert 'running eps 8: APGD-JS-Avg' in out and 'ETA' in out


def test_same_seed_same_result(
    reference,
    run_tool,
    small_config,
    checkpoint,
    synthetic_root,
    data_options,
    tmp_path,
):
    again, _ = _test(
        run_tool,
        small_config,
        checkpoint,
        str(tmp_path),
        SEA + ['evaluator.resume=False'] + data_options(synthetic_root),
    )
    assert again['summary'] == reference[0]['summary']


def test_two_processes_equal_one(
    reference,
    run_tool,
    small_config,
    checkpoint,
    synthetic_root,
    data_options,
    tmp_path,
):
    dist, out = _test(
        run_tool,
        small_config,
        checkpoint,
        str(tmp_path),
        SEA + ['evaluator.resume=False'] + data_options(synthetic_root),
        launcher='dist',
        env=dict(PORT='29661', CUDA_VISIBLE_DEVICES=''),
    )
    assert 'Distributed training: True' in out
    assert dist['summary'] == reference[0]['summary']


def test_interrupted_then_resumed_equals_uninterrupted(
    reference,
    run_tool,
    small_config,
    checkpoint,
    synthetic_root,
    data_options,
    tmp_path,
):
    work = str(tmp_path)
    opts = SEA + data_options(synthetic_root)
    full, _ = _test(run_tool, small_config, checkpoint, work, opts)
    assert full['summary'] == reference[0]['summary']
    # Simulate a kill after 3 images: keep their records and half of the 4th's.
    (cache,) = glob.glob(osp.join(work, 'robustness_cache', '*', 'rank0.jsonl'))
    lines = open(cache).read().splitlines(keepends=True)
    records = [line for line in lines if '"unit"' not in line]
    units = [line for line in lines if '"unit"' in line]
    # one unit per image, eps and attack; one record per finished image
    assert len(records) == N_IMAGES and len(units) == 3 * N_IMAGES
    with open(cache, 'w') as f:
        f.writelines(records[:3])
        f.write(records[3][: len(records[3]) // 2])
    for old in glob.glob(osp.join(work, 'robustness_*.json')):
        os.remove(old)
    resumed, out = _test(run_tool, small_config, checkpoint, work, opts)
    assert '3 images already done' in out
    assert '(4 attacked, 3 from cache)' in out
    assert resumed['summary'] == reference[0]['summary']

    # Killed in the middle of batches: every attack at eps 0 and 2 finished on
    # every batch, none at eps 8; those attacks are not run again.
    with open(cache, 'w') as f:
        f.writelines(
            line for line in units if '"eps":"0"' in line or '"eps":"2"' in line
        )
    for old in glob.glob(osp.join(work, 'robustness_*.json')):
        os.remove(old)
    resumed, out = _test(run_tool, small_config, checkpoint, work, opts)
    assert 'attacks of interrupted batches restored' in out
    assert 'running eps 8' in out
    assert 'running eps 2' not in out and 'running eps 0' not in out
    assert resumed['summary'] == reference[0]['summary']


def test_cache_key_holds_the_checkpoint_content_and_the_test_pipeline(
    run_tool, small_config, checkpoint, synthetic_root, data_options, tmp_path
):
    """A retrained checkpoint of the same size at the same path, or another test
    pipeline, is another evaluation: computed again, not read from the cache."""
    import torch

    ckpt = str(tmp_path / 'model.pth')
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)
    torch.save(state, ckpt)
    work = str(tmp_path / 'work')
    opts = [
        'evaluator.type=SEA',
        'evaluator.eps=8',
        'evaluator.steps=4',
        'test_dataloader.dataset.indices=2',
        'test_dataloader.batch_size=2',
    ] + data_options(synthetic_root)
    first, out = _test(run_tool, small_config, ckpt, work, opts)
    assert '(2 attacked, 0 from cache)' in out
    _, out = _test(run_tool, small_config, ckpt, work, opts)
    assert '(0 attacked, 2 from cache)' in out  # same evaluation: cached
    # "retrain": other weights, same file size, same path
    weight = state['state_dict']['decode_head.conv_seg.weight']
    weight.mul_(-1.0)
    size = os.path.getsize(ckpt)
    torch.save(state, ckpt)
    assert os.path.getsize(ckpt) == size
    second, out = _test(run_tool, small_config, ckpt, work, opts)
    assert '(2 attacked, 0 from cache)' in out
    assert second['summary']['clean'] != first['summary']['clean']
    # another test pipeline (here another image decoder): computed again
    _, out = _test(
        run_tool,
        small_config,
        ckpt,
        work,
        opts + ['test_dataloader.dataset.pipeline.0.imdecode_backend=pillow'],
    )
    assert '(2 attacked, 0 from cache)' in out


def test_checkpoint_with_other_class_count_is_refused(
    run_tool, small_config, checkpoint, synthetic_root, data_options, tmp_path
):
    with pytest.raises(AssertionError) as err:
        run_tool(
            [
                'python',
                'tools/test.py',
                small_config,
                checkpoint,
                '--work-dir',
                str(tmp_path),
                '--cfg-options',
                'model.decode_head.num_classes=6',
            ]
            + SEA
            + data_options(synthetic_root)
        )
    msg = str(err.value)
    assert 'wrong shape' in msg and 'test random weights' in msg
    assert 'decode_head.conv_seg.weight' in msg and 'num_classes' in msg


def test_plain_test_refuses_a_checkpoint_that_does_not_fit(
    run_tool, small_config, checkpoint, synthetic_root, data_options, tmp_path
):
    # no attack evaluator: mmseg's own test, which alone would only warn
    with pytest.raises(AssertionError) as err:
        run_tool(
            [
                'python',
                'tools/test.py',
                small_config,
                checkpoint,
                '--work-dir',
                str(tmp_path),
                '--cfg-options',
                'model.decode_head.num_classes=6',
            ]
            + data_options(synthetic_root)
        )
    msg = str(err.value)
    assert 'wrong shape' in msg and 'decode_head.conv_seg.weight' in msg


@pytest.mark.parametrize(
    'opts, match',
    [
        (['evaluator=FOO'], "unknown evaluator 'FOO'"),
        (['evaluator.type=SEA', 'evaluator.eps=-1'], 'eps'),
        (['evaluator.type=PGD', 'evaluator.norm=L1'], 'Linf'),
        (['evaluator.type=SEA', 'evaluator.iters=3'], 'unknown evaluator option'),
    ],
)
def test_bad_evaluator_options(
    opts,
    match,
    run_tool,
    small_config,
    checkpoint,
    synthetic_root,
    data_options,
    tmp_path,
):
    with pytest.raises(AssertionError, match=match):
        run_tool(
            [
                'python',
                'tools/test.py',
                small_config,
                checkpoint,
                '--work-dir',
                str(tmp_path),
                '--cfg-options',
            ]
            + opts
            + data_options(synthetic_root)
        )
