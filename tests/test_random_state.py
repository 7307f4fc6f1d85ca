"""RandomStateHook: only a resume restores the saved random state (load_from keeps
the configured seed), and under DDP every rank saves and restores its own state."""

import os
import os.path as osp
import random
import types

import numpy as np
import pytest
import torch

# importing mmseg_robust allow-lists the checkpoints' globals for weights_only
from mmseg_robust.engine import RandomStateHook
from mmseg_robust.engine import random_state as random_state_module

PIRAT = 'configs/synthetic/upernet_convnext-micro_pirat_synthetic.py'


# ------------------------------------------------------------------ helpers
def _capture():
    """The process's random state, in the hook's per-process format."""
    return dict(
        torch=torch.get_rng_state(),
        numpy=np.random.get_state(),
        python=random.getstate(),
    )


@pytest.fixture(autouse=True)
def keep_global_random_state():
    """The unit tests reseed the global generators: put them back afterwards."""
    saved = _capture()
    yield
    RandomStateHook.restore(saved)


def _seed(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _draws():
    return (
        torch.rand(4).tolist(),
        np.random.rand(4).tolist(),
        [random.random() for _ in range(4)],
    )


def _state_of_seed(seed):
    _seed(seed)
    return _capture()


def _runner(it, checkpoint_interval=1, max_iters=100):
    """What the hook reads from the runner: the train loop's iteration, the
    CheckpointHook (every ``checkpoint_interval`` iterations) and max_iters."""
    from mmengine.hooks import CheckpointHook

    return types.SimpleNamespace(
        iter=it,
        max_iters=max_iters,
        hooks=[CheckpointHook(interval=checkpoint_interval, by_epoch=False)],
    )


def _fake_dist(monkeypatch, rank, world_size, gathered=None):
    monkeypatch.setattr(
        random_state_module, 'get_dist_info', lambda: (rank, world_size), raising=False
    )
    monkeypatch.setattr(
        random_state_module,
        'all_gather_object',
        lambda obj: list(gathered),
        raising=False,
    )


def _load(hook, checkpoint, runner_iter):
    """mmengine's order: load_checkpoint (load_from or inside resume), then the
    loop's before_train, then (after advancing the data loader) the restore."""
    hook.after_load_checkpoint(_runner(runner_iter), checkpoint)
    hook.before_train(_runner(runner_iter))
    return hook.restore_loaded()


# --------------------------------------------------------------- unit tests
def test_load_from_keeps_the_seeded_state():
    # A checkpoint saved by the hook (state of seed 123) at iteration 4.
    _seed(123)
    ckpt = dict(meta=dict(iter=4))
    RandomStateHook().before_save_checkpoint(_runner(3), ckpt)
    _seed(0)
    expected = _draws()
    # load_from: the loop stays at iteration 0 -> nothing restored
    _seed(0)
    assert not _load(RandomStateHook(), ckpt, runner_iter=0)
    assert _draws() == expected


def test_resume_restores_the_saved_state():
    _seed(123)
    ckpt = dict(meta=dict(iter=4))
    RandomStateHook().before_save_checkpoint(_runner(3), ckpt)
    expected = _draws()
    _seed(0)
    # resume: Runner.resume sets the loop's iteration to the checkpoint's
    assert _load(RandomStateHook(), ckpt, runner_iter=4)
    assert _draws() == expected


def test_every_rank_saves_and_restores_its_own_state(monkeypatch):
    states = [_state_of_seed(10), _state_of_seed(11)]
    expected = []
    for s in states:
        RandomStateHook.restore(s)
        expected.append(_draws())
    # rank 0 gathers in after_train_iter, then saves (master only)
    hook = RandomStateHook()
    _fake_dist(monkeypatch, 0, 2, gathered=states)
    hook.after_train_iter(_runner(5), batch_idx=5)
    ckpt = dict(meta=dict(iter=6))
    hook.before_save_checkpoint(_runner(5), ckpt)
    assert ckpt['random_state']['world_size'] == 2
    assert len(ckpt['random_state']['states']) == 2
    for rank in (0, 1):
        _fake_dist(monkeypatch, rank, 2)
        _seed(0)
        assert _load(RandomStateHook(), ckpt, runner_iter=6)
        assert _draws() == expected[rank], rank


def test_saved_outside_a_train_iteration_holds_only_the_own_state(monkeypatch):
    hook = RandomStateHook()
    _fake_dist(monkeypatch, 0, 2, gathered=[_state_of_seed(1)] * 2)
    hook.after_train_iter(_runner(5), batch_idx=5)
    ckpt = dict(meta=dict(iter=6))
    hook.before_save_checkpoint(_runner(6), ckpt)  # e.g. a best checkpoint
    states = ckpt['random_state']['states']
    assert states[0] is not None and states[1] is None
    # rank 1 resumes without a state of its own: keeps its seeded state
    _fake_dist(monkeypatch, 1, 2)
    _seed(0)
    expected = _draws()
    _seed(0)
    assert not _load(RandomStateHook(), ckpt, runner_iter=6)
    assert _draws() == expected


def test_states_are_gathered_only_when_a_checkpoint_is_saved(monkeypatch):
    """Under DDP the all_gather runs at the CheckpointHook's iterations only
    (every `interval` iterations and the last one), on every rank alike."""
    calls = []
    _fake_dist(monkeypatch, 0, 2)

    def all_gather_object(obj):
        calls.append(obj)
        return [obj, obj]

    monkeypatch.setattr(random_state_module, 'all_gather_object', all_gather_object)
    hook = RandomStateHook()
    gathered_at = []
    for it in range(8):
        runner = _runner(it, checkpoint_interval=3, max_iters=8)
        n = len(calls)
        hook.after_train_iter(runner, batch_idx=it)
        if len(calls) > n:
            gathered_at.append(it)
        # the checkpoint the CheckpointHook saves right after holds both states
        if it in (2, 5, 7):
            ckpt = dict(meta=dict(iter=it + 1))
            hook.before_save_checkpoint(runner, ckpt)
            assert all(s is not None for s in ckpt['random_state']['states'])
    # CheckpointHook saves after iterations 3, 6 and the last one (8)
    assert gathered_at == [2, 5, 7]
    # no CheckpointHook (or by_epoch): never gathered
    from mmengine.hooks import CheckpointHook

    calls.clear()
    for hooks in ([], [CheckpointHook(interval=1, by_epoch=True)]):
        runner = types.SimpleNamespace(iter=2, max_iters=3, hooks=hooks)
        hook.after_train_iter(runner, batch_idx=2)
    assert calls == []
    # one process: nothing to gather
    _fake_dist(monkeypatch, 0, 1)
    monkeypatch.setattr(random_state_module, 'all_gather_object', all_gather_object)
    hook.after_train_iter(_runner(2), batch_idx=2)
    assert calls == []


@pytest.mark.parametrize('saved,now', [(2, 1), (1, 2), (2, 4)])
def test_a_different_world_size_restores_nothing(monkeypatch, saved, now):
    states = [_state_of_seed(10 + r) for r in range(saved)]
    ckpt = dict(meta=dict(iter=6), random_state=dict(world_size=saved, states=states))
    for rank in range(now):
        _fake_dist(monkeypatch, rank, now)
        _seed(0)
        expected = _draws()
        _seed(0)
        assert not _load(RandomStateHook(), ckpt, runner_iter=6)
        assert _draws() == expected


def test_a_random_state_in_another_format_is_a_checkpoint_error():
    """Only ``dict(world_size=W, states=[...])`` is read: a bare state dict (no
    per-rank states) is refused with the fix, not restored on rank 0."""
    from mmseg_robust.models.checkpoint import CheckpointError

    for entry in (
        _state_of_seed(7),
        dict(world_size=2, states=[_state_of_seed(7)]),
        [_state_of_seed(7)],
    ):
        ckpt = dict(meta=dict(iter=6), random_state=entry)
        with pytest.raises(
            CheckpointError, match="delete checkpoint\\['random_state'\\]"
        ):
            _load(RandomStateHook(), ckpt, runner_iter=6)


# ------------------------------------------------------------ end to end
def _weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _differ(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


# Drop path in the backbone and dropout in the head draw random numbers every
# iteration; no validation; LR schedule independent of max_iters.
OPTS = [
    'train_cfg.val_begin=1000',
    'default_hooks.checkpoint.interval=1',
    'default_hooks.logger.interval=1',
    'param_scheduler.0.end=1',
    'param_scheduler.1.begin=1',
    'param_scheduler.1.end=4',
    'train_dataloader.batch_size=2',
    'model.backbone.drop_path_rate=0.2',
    'randomness.seed=0',
]


def test_load_from_trains_with_the_configured_seed(
    run_tool, synthetic_root, data_options, tmp_path
):
    # Two checkpoints with the same weights but different random states, given
    # as load_from (no --resume): both runs must train like the seed says.
    # (The weights are the model's seeded initialisation: an empty state_dict,
    # which mmengine's non-strict load_checkpoint accepts.)
    opts = OPTS + data_options(synthetic_root)
    results, outs = [], []
    for seed in (1, 2):
        ckpt = dict(meta=dict(iter=7, epoch=0), state_dict={})
        _seed(seed)
        RandomStateHook().before_save_checkpoint(_runner(6), ckpt)
        path = str(tmp_path / f'random_state_{seed}.pth')
        torch.save(ckpt, path)
        work = str(tmp_path / f'run{seed}')
        outs.append(
            run_tool(
                [
                    'python',
                    'tools/train.py',
                    PIRAT,
                    '--work-dir',
                    work,
                    '--cfg-options',
                    f'load_from={path}',
                    'train_cfg.max_iters=1',
                ]
                + opts
            )
        )
        assert f'Load checkpoint from {path}' in outs[-1]
        results.append(_weights(osp.join(work, 'iter_1.pth')))
    _assert_same_weights(*results)
    assert not any('Restored the random state' in out for out in outs)


def _config_with_probe(tmp_path, base):
    """``base`` plus the NormStatsProbe hook of tests/norm_stats_probe.py (the
    tests directory goes on the tools' PYTHONPATH, see ``_probe_env``)."""
    path = tmp_path / 'with_probe.py'
    path.write_text(
        f'_base_ = {osp.abspath(base)!r}\n'
        "custom_imports = dict(imports=['mmseg_robust', 'norm_stats_probe'], "
        'allow_failed_imports=False)\n'
        "custom_hooks = [dict(type='NormStatsProbe')]\n"
    )
    return str(path)


def _probe_env(repo_root):
    path = [osp.join(repo_root, 'tests'), os.environ.get('PYTHONPATH', '')]
    return dict(PYTHONPATH=os.pathsep.join(p for p in path if p))


def test_ddp_resume_equals_uninterrupted(
    run_tool, repo_root, synthetic_root, data_options, tmp_path, free_port
):
    # Two gloo CPU processes with different per-rank streams (diff_rank_seed)
    # and different batches, BatchNorm in the heads: 2 iterations straight vs.
    # resumed from that run's checkpoint at 1 (in a new work_dir: --resume with
    # load_from resumes from that file), batch 2 per process. Both validate
    # after iteration 2, where every process records its BatchNorm statistics
    # (NormStatsProbe): the loop gives every process rank 0's after each update
    # (AdversarialTrainLoop._sync_norm_stats), so the ranks validate the model
    # that the checkpoint holds.
    opts = [o for o in OPTS if not o.startswith('train_cfg.val_begin=')]
    opts += [
        'train_cfg.val_begin=2',
        'train_cfg.val_interval=2',
        'randomness.diff_rank_seed=True',
    ] + data_options(synthetic_root)
    config = _config_with_probe(tmp_path, PIRAT)

    def dist_train(work, load_from, *extra):
        return run_tool(
            ['bash', 'tools/dist_train.sh', config, '2', '--work-dir', work]
            + list(extra)
            + ['--cfg-options', f'load_from={load_from}', 'train_cfg.max_iters=2']
            + opts,
            env=dict(
                PORT=free_port(), CUDA_VISIBLE_DEVICES='', **_probe_env(repo_root)
            ),
        )

    full = str(tmp_path / 'full')
    dist_train(full, None)
    resumed = str(tmp_path / 'resumed')
    out = dist_train(resumed, osp.join(full, 'iter_1.pth'), '--resume')
    assert 'Restored the random state saved at iteration 1' in out
    assert 'Iter(train) [1/2]' not in out
    final = _weights(osp.join(full, 'iter_2.pth'))
    _assert_same_weights(final, _weights(osp.join(resumed, 'iter_2.pth')))
    # the checkpoint holds both ranks' (different) states, and the iteration
    # after the resume changes the weights (the comparison is not vacuous)
    saved = torch.load(
        osp.join(full, 'iter_1.pth'), map_location='cpu', weights_only=True
    )['random_state']
    assert saved['world_size'] == 2
    assert not torch.equal(saved['states'][0]['torch'], saved['states'][1]['torch'])
    assert _differ(_weights(osp.join(full, 'iter_1.pth')), final)
    # At the validation after iteration 2 both ranks hold the checkpoint's
    # BatchNorm statistics, which training changed (BN heads: not vacuous).
    for work in (full, resumed):
        for rank in (0, 1):
            stats = torch.load(
                osp.join(work, f'norm_stats_iter2_rank{rank}.pth'), weights_only=True
            )
            assert len(stats) > 0 and stats.keys() <= final.keys()
            for key, value in stats.items():
                assert torch.equal(value, final[key]), (work, rank, key)
    assert any(
        k.endswith('running_var') and not torch.equal(v, torch.ones_like(v))
        for k, v in stats.items()
    )
