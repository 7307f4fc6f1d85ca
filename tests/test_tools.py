"""End to end through the stock tools: train, test, 2-process gloo, --resume."""
import glob
import json
import os.path as osp

import torch

ITERS = ['train_cfg.max_iters=6', 'train_cfg.val_interval=6',
         'default_hooks.checkpoint.interval=3',
         'default_hooks.logger.interval=1',
         'param_scheduler.0.end=2', 'param_scheduler.1.begin=2',
         'param_scheduler.1.end=6',
         'train_dataloader.batch_size=4']


def _train(run_tool, cfg, work, data_opts, extra=(), launcher=None):
    if launcher == 'dist':
        cmd = ['bash', 'tools/dist_train.sh', cfg, '2']
    else:
        cmd = ['python', 'tools/train.py', cfg]
    cmd += ['--work-dir', work]
    cmd += list(extra)
    cmd += ['--cfg-options'] + ITERS + data_opts
    return cmd


def test_train_then_test(run_tool, small_config, synthetic_root, data_options,
                         tmp_path):
    work = str(tmp_path / 'clean')
    out = run_tool(
        _train(run_tool, small_config, work, data_options(synthetic_root)))
    assert 'Iter(train) [6/6]' in out
    ckpt = osp.join(work, 'iter_6.pth')
    assert osp.exists(ckpt)
    out = run_tool([
        'python', 'tools/test.py', small_config, ckpt, '--work-dir',
        str(tmp_path / 'test'), '--cfg-options'
    ] + data_options(synthetic_root))
    assert 'mIoU' in out
    results = glob.glob(str(tmp_path / 'test' / '*' / '*.json'))
    assert results, 'tools/test.py wrote no metrics JSON'
    metrics = json.load(open(results[0]))
    assert 0.0 <= metrics['mIoU'] <= 100.0


def test_resume_continues_interrupted_run(run_tool, small_config,
                                          synthetic_root, data_options,
                                          tmp_path):
    work = str(tmp_path / 'resume')
    # Interrupted after the checkpoint at iter 3: the run's max_iters is 6 but the
    # process stops at 3 (as if killed right after saving).
    run_tool(
        _train(run_tool, small_config, work, data_options(synthetic_root)) +
        ['train_cfg.max_iters=3'])
    assert osp.exists(osp.join(work, 'iter_3.pth'))
    out = run_tool(
        _train(
            run_tool,
            small_config,
            work,
            data_options(synthetic_root),
            extra=['--resume']))
    assert 'resumed epoch: 0, iter: 3' in out
    assert 'Iter(train) [4/6]' in out and 'Iter(train) [1/6]' not in out
    ckpt = torch.load(osp.join(work, 'iter_6.pth'), weights_only=True)
    assert ckpt['meta']['iter'] == 6


def test_dist_train_two_cpu_processes(run_tool, small_config, synthetic_root,
                                      data_options, tmp_path):
    work = str(tmp_path / 'dist')
    out = run_tool(
        _train(
            run_tool,
            small_config,
            work,
            data_options(synthetic_root),
            launcher='dist'),
        env=dict(PORT='29641', CUDA_VISIBLE_DEVICES=''))
    assert 'Distributed training: True' in out
    assert 'GPU number: 2' in out  # mmengine's name for the world size
    assert 'using the gloo backend instead of nccl' in out
    assert osp.exists(osp.join(work, 'iter_6.pth'))
