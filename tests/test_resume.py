"""Resuming a training run (mmseg_robust/engine/resume.py): --resume with
load_from set continues the work dir's own run, a resume with nothing left to
train is refused, and the opt-in fast skip advances the sampler only."""

import logging
import os
import os.path as osp
import random
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import DefaultSampler, InfiniteSampler, pseudo_collate
from mmengine.runner import EpochBasedTrainLoop
from mmengine.runner.loops import _InfiniteDataloaderIterator
from torch.utils.data import DataLoader, Dataset, RandomSampler

from mmseg_robust.engine import RandomStateHook, ResumeCheckHook, configure_resume
from mmseg_robust.engine import resume as resume_module
from mmseg_robust.engine.adversarial_training import _RestoreAfterSkip

PIRAT = 'configs/synthetic/upernet_convnext-micro_pirat_synthetic.py'


# --------------------------------------------------- --resume with load_from
def test_configure_resume_prefers_the_work_dirs_checkpoint(tmp_path):
    work = tmp_path / 'work'
    work.mkdir()

    def configured(**cfg):
        cfg = Config(dict(dict(work_dir=str(work), custom_hooks=[]), **cfg))
        configure_resume(cfg)
        return cfg

    # no checkpoint of its own yet: mmengine's rule (resume from load_from)
    cfg = configured(resume=True, load_from='clean/iter_1000.pth')
    assert cfg.load_from == 'clean/iter_1000.pth'
    assert cfg.custom_hooks == [dict(type='ResumeCheckHook')]
    (work / 'last_checkpoint').write_text(str(work / 'iter_2.pth'))
    cfg = configured(resume=True, load_from='clean/iter_1000.pth')
    assert cfg.load_from == str(work / 'iter_2.pth')
    assert cfg.custom_hooks == [
        dict(type='ResumeCheckHook', replaced_load_from='clean/iter_1000.pth')
    ]
    # without --resume, or without load_from (mmengine resumes the work dir's
    # latest itself), nothing changes
    assert configured(resume=False, load_from='a.pth').load_from == 'a.pth'
    assert configured(resume=True, load_from=None).load_from is None
    # the hook is added once, other hooks are kept
    cfg = Config(
        dict(
            work_dir=str(work),
            custom_hooks=[dict(type='A'), dict(type='ResumeCheckHook')],
        )
    )
    configure_resume(cfg)
    assert cfg.custom_hooks == [dict(type='A'), dict(type='ResumeCheckHook')]


def _runner(it, max_iters, loop=None):
    return types.SimpleNamespace(
        iter=it,
        max_iters=max_iters,
        epoch=0,
        train_loop=loop or types.SimpleNamespace(),
        _load_from='w/iter_3.pth',
    )


@pytest.mark.parametrize('it,max_iters', [(3, 3), (1000, 300)])
def test_a_resume_with_nothing_left_to_train_is_refused(it, max_iters):
    with pytest.raises(RuntimeError) as err:
        ResumeCheckHook().before_train(_runner(it, max_iters))
    msg = str(err.value)
    assert f'Resumed at iteration {it} from w/iter_3.pth' in msg
    assert f'train_cfg.max_iters={max_iters}' in msg
    assert 'raise train_cfg.max_iters' in msg
    assert 'fresh work dir without --resume' in msg


def test_a_resume_with_iterations_left_or_a_fresh_run_passes():
    ResumeCheckHook().before_train(_runner(2, 3))
    ResumeCheckHook().before_train(_runner(0, 3))  # not resumed


def test_an_epoch_based_resume_past_max_epochs_names_max_epochs():
    loop = EpochBasedTrainLoop.__new__(EpochBasedTrainLoop)
    loop._max_epochs = 2
    runner = _runner(20, 20, loop)
    runner.epoch = 2
    with pytest.raises(RuntimeError, match=r'raise train_cfg.max_epochs'):
        ResumeCheckHook().before_train(runner)


def _weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


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


def test_resume_with_load_from_continues_the_work_dir(
    synthetic_root, data_options, tmp_path
):
    """The synthetic robust config (load_from: the clean model's iteration
    1000; here a stand-in checkpoint of the seeded initialisation) trained for
    2 iterations, then resumed with max_iters=3 and the fast skip: it resumes
    the work dir's iteration 2 (not load_from's 1000), skips 2 batches without
    loading them, trains iteration 3 only and equals an uninterrupted 3-iteration
    run bitwise (num_workers=0: the restored random state covers the
    augmentations). Resuming the finished run again is refused."""
    clean = str(tmp_path / 'iter_1000.pth')
    ckpt = dict(meta=dict(iter=1000, epoch=0), state_dict={})
    RandomStateHook().before_save_checkpoint(None, ckpt)
    torch.save(ckpt, clean)
    opts = OPTS + data_options(synthetic_root) + [f'load_from={clean}']

    def train(work, max_iters, *extra):
        return [
            'tools/train.py',
            PIRAT,
            '--work-dir',
            work,
            *extra,
            '--cfg-options',
            f'train_cfg.max_iters={max_iters}',
        ] + opts

    full, work = str(tmp_path / 'full'), str(tmp_path / 'work')
    # The four runs one after the other in one interpreter (import paid once),
    # the last one refused: the uninterrupted run, the interrupted one, its
    # resume, and the finished run resumed again.
    runs = [
        train(full, 3),
        train(work, 2),
        train(work, 3, '--resume') + ['train_cfg.resume_skip=sampler'],
        train(work, 3, '--resume'),
    ]
    argv = [sys.executable, 'tests/tools_in_one_process.py']
    for run in runs:
        argv += ([':::'] if len(argv) > 2 else []) + run
    proc = subprocess.run(
        argv,
        cwd=osp.dirname(osp.dirname(osp.abspath(__file__))),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
        env=dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1')),
    )
    # tools_in_one_process.py prints '=== TOOL ARGS' before each run
    outs = ('\n' + proc.stdout).split('\n=== tools/train.py ')[1:]
    assert len(outs) == 4, proc.stdout[-6000:]
    assert 'Iter(train) [3/3]' in outs[0] and 'Iter(train) [2/2]' in outs[1]
    out = outs[2]
    latest = osp.join(work, 'iter_2.pth')
    assert (
        f'Resuming from the latest checkpoint in the work dir, {latest}, not '
        f'from load_from={clean}' in out
    )
    assert 'resumed epoch: 0, iter: 2' in out
    assert 'Skipped the 2 trained batches by advancing the InfiniteSampler' in out
    assert 'Restored the random state saved at iteration 2' in out
    assert 'Iter(train) [3/3]' in out
    assert 'Iter(train) [1/3]' not in out and 'Iter(train) [2/3]' not in out
    a, b = (
        _weights(osp.join(full, 'iter_3.pth')),
        _weights(osp.join(work, 'iter_3.pth')),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], v) for k, v in _weights(latest).items())

    # the finished run resumed again: refused, naming the fix
    assert proc.returncode != 0
    assert 'Resumed at iteration 3 from' in outs[3]
    assert 'raise train_cfg.max_iters' in outs[3], outs[3][-3000:]


# ------------------------------------------------------------ the fast skip
class _Counting(Dataset):
    """Items 0..n-1, counting the loads (``__getitem__`` calls)."""

    def __init__(self, n):
        self.n, self.loads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.loads += 1
        # an augmentation draw from the main process's generators
        return (i, float(torch.rand(())), np.random.rand(), random.random())


def _iterator(sampler, n=10, batch_size=3):
    data = _Counting(n)
    loader = DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler(data),
        collate_fn=pseudo_collate,
        num_workers=0,
    )
    return _InfiniteDataloaderIterator(loader), data


def _after_resume(skip, sampler, k, draws, state):
    """The batches a loop resumed at iteration ``k`` trains on (mmengine's
    IterBasedTrainLoop.run: ``k`` draws to discard, then ``draws`` to use), with
    the random state ``state`` restored after the skip; and the loads."""
    torch.manual_seed(123)  # a different state before the skip
    iterator, data = _iterator(sampler)
    hook = RandomStateHook()
    hook.loaded = state
    wrapped = _RestoreAfterSkip(iterator, types.SimpleNamespace(iter=k), hook, skip)
    for _ in range(k):
        next(wrapped)
    loads = data.loads
    return [next(wrapped) for _ in range(draws)], loads


SAMPLERS = dict(
    infinite=lambda d: InfiniteSampler(d, shuffle=True, seed=0),
    default=lambda d: DefaultSampler(d, shuffle=True, seed=0),
)


@pytest.mark.parametrize('name', ['infinite', 'default'])
@pytest.mark.parametrize('k', [0, 1, 3, 4, 5, 8, 9])
def test_the_sampler_skip_draws_what_an_uninterrupted_run_draws(monkeypatch, name, k):
    # DefaultSampler: 10 items in batches of 3 -> 4 batches per epoch, so k
    # covers mid-epoch, an epoch's end (4, 8) and the next epoch.
    import mmengine.runner.loops as loops

    monkeypatch.setattr(loops.time, 'sleep', lambda s: None)  # epoch ends
    sampler = SAMPLERS[name]
    # the uninterrupted run: k batches, then (checkpoint) the random state
    torch.manual_seed(0)
    iterator, _ = _iterator(sampler)
    for _ in range(k):
        next(iterator)
    state = RandomStateHook.capture()
    expected = [next(iterator) for _ in range(6)]
    replayed, replay_loads = _after_resume('replay', sampler, k, 6, state)
    skipped, skip_loads = _after_resume('sampler', sampler, k, 6, state)
    assert replayed == expected
    assert skipped == expected
    # replay loads every skipped batch (DefaultSampler: 3 + 3 + 3 + 1 per epoch)
    full_epochs, rest = divmod(k, 4)
    loaded = 3 * k if name == 'infinite' else 10 * full_epochs + 3 * rest
    assert replay_loads == loaded
    assert skip_loads == 0  # nothing loaded for the k skipped batches


def test_a_sampler_the_fast_skip_cannot_advance_is_refused():
    data = _Counting(10)
    loader = DataLoader(data, batch_size=2, sampler=RandomSampler(data))
    with pytest.raises(ValueError) as err:
        resume_module.check_sampler_skip(loader)
    msg = str(err.value)
    assert "train_cfg.resume_skip='sampler'" in msg and 'RandomSampler' in msg
    assert "resume_skip='replay'" in msg
    batches = DataLoader(
        data, batch_sampler=[[0, 1], [2, 3]], collate_fn=pseudo_collate
    )
    with pytest.raises(ValueError, match="resume_skip='replay'"):
        resume_module.check_sampler_skip(batches)
    # the supported ones pass
    for make in (SAMPLERS['infinite'], SAMPLERS['default']):
        resume_module.check_sampler_skip(DataLoader(data, sampler=make(data)))


def test_the_sampler_skip_with_worker_processes_says_the_augmentations_differ(
    monkeypatch,
):
    # The same items as an uninterrupted run, but the workers' random streams
    # restart: the log says the augmentation draws differ.
    logged = []
    monkeypatch.setattr(
        resume_module, 'print_log', lambda msg, **kw: logged.append((msg, kw))
    )
    data = _Counting(10)

    def loader():
        return DataLoader(
            data,
            batch_size=3,
            sampler=InfiniteSampler(data, shuffle=True, seed=0),
            collate_fn=pseudo_collate,
            num_workers=1,
        )

    uninterrupted = _InfiniteDataloaderIterator(loader())
    expected = [next(uninterrupted)[0] for _ in range(5)][2:]  # the items' indices
    iterator = _InfiniteDataloaderIterator(loader())
    resume_module.skip_by_sampler(iterator, 2)
    assert [next(iterator)[0] for _ in range(3)] == expected
    ((msg, kw),) = logged
    assert 'Skipped the 2 trained batches by advancing the InfiniteSampler' in msg
    assert 'worker processes' in msg and "differ from an uninterrupted run's" in msg
    assert kw['level'] == logging.WARNING
