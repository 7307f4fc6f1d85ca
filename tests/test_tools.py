"""End to end through the stock tools: train, test, 2-process gloo, --resume."""

import glob
import json
import os.path as osp

import numpy as np
import pytest
import torch

ITERS = [
    'train_cfg.max_iters=6',
    'train_cfg.val_interval=6',
    'default_hooks.checkpoint.interval=3',
    'default_hooks.logger.interval=1',
    'param_scheduler.0.end=2',
    'param_scheduler.1.begin=2',
    'param_scheduler.1.end=6',
    'train_dataloader.batch_size=4',
]


def _train(run_tool, cfg, work, data_opts, extra=()):
    cmd = ['python', 'tools/train.py', cfg, '--work-dir', work]
    cmd += list(extra)
    cmd += ['--cfg-options'] + ITERS + data_opts
    return cmd


def _pooled_miou(config, checkpoint, data_root, num_classes=5, ignore_index=255):
    """mIoU (%) of the checkpoint on the val split, pooled over images as mmseg's
    IoUMetric does, from mmseg's single-image inference API and numpy."""
    from mmseg.apis import inference_model, init_model
    from PIL import Image

    import mmseg_robust  # noqa: F401  (registers the synthetic model's modules)

    model = init_model(config, checkpoint, device='cpu')
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for img in sorted(glob.glob(osp.join(data_root, 'img_dir', 'val', '*.png'))):
        label = np.array(Image.open(img.replace('img_dir', 'ann_dir')))
        pred = inference_model(model, img).pred_sem_seg.data[0].numpy()
        valid = label != ignore_index
        for c in range(num_classes):
            p, gt = (pred == c) & valid, (label == c) & valid
            inter[c] += (p & gt).sum()
            union[c] += (p | gt).sum()
    assert union.sum() > 0, 'no val images found'
    return 100 * float(np.mean(inter[union > 0] / union[union > 0]))


def test_train_then_test(
    run_tool, small_config, synthetic_root, data_options, tmp_path
):
    work = str(tmp_path / 'clean')
    out = run_tool(_train(run_tool, small_config, work, data_options(synthetic_root)))
    assert 'Iter(train) [6/6]' in out
    ckpt = osp.join(work, 'iter_6.pth')
    assert osp.exists(ckpt)
    out = run_tool(
        [
            'python',
            'tools/test.py',
            small_config,
            ckpt,
            '--work-dir',
            str(tmp_path / 'test'),
            '--cfg-options',
        ]
        + data_options(synthetic_root)
    )
    assert 'mIoU' in out
    results = glob.glob(str(tmp_path / 'test' / '*' / '*.json'))
    assert results, 'tools/test.py wrote no metrics JSON'
    metrics = json.load(open(results[0]))
    # the value, not only its range: the trained checkpoint's mIoU on the val split
    # (the tool rounds to 2 decimals)
    assert metrics['mIoU'] == pytest.approx(
        _pooled_miou(small_config, ckpt, synthetic_root), abs=0.011
    )


def test_resume_continues_interrupted_run(
    run_tool, small_config, synthetic_root, data_options, tmp_path
):
    work = str(tmp_path / 'resume')
    # Interrupted after the checkpoint at iter 3: the run's max_iters is 6 but the
    # process stops at 3 (as if killed right after saving).
    run_tool(
        _train(run_tool, small_config, work, data_options(synthetic_root))
        + ['train_cfg.max_iters=3']
    )
    assert osp.exists(osp.join(work, 'iter_3.pth'))
    out = run_tool(
        _train(
            run_tool,
            small_config,
            work,
            data_options(synthetic_root),
            extra=['--resume'],
        )
    )
    assert 'resumed epoch: 0, iter: 3' in out
    assert 'Iter(train) [4/6]' in out and 'Iter(train) [1/6]' not in out
    ckpt = torch.load(osp.join(work, 'iter_6.pth'), weights_only=True)
    assert ckpt['meta']['iter'] == 6


def test_dist_train_and_test_of_a_syncbn_config_on_cpu(
    run_tool, small_config, synthetic_root, data_options, tmp_path, free_port
):
    # Two gloo CPU processes. DDP refuses SyncBatchNorm in CPU modules: the
    # launchers convert the heads' SyncBN layers to BatchNorm with a warning,
    # train and test.
    work = str(tmp_path / 'syncbn')
    syncbn = [
        'model.decode_head.norm_cfg.type=SyncBN',
        'model.auxiliary_head.norm_cfg.type=SyncBN',
    ]
    env = dict(CUDA_VISIBLE_DEVICES='')
    out = run_tool(
        [
            'bash',
            'tools/dist_train.sh',
            small_config,
            '2',
            '--work-dir',
            work,
            '--cfg-options',
            'train_cfg.max_iters=1',
            'train_cfg.val_interval=1000',
            'default_hooks.checkpoint.interval=1',
            'train_dataloader.batch_size=2',
        ]
        + syncbn
        + data_options(synthetic_root),
        env=dict(env, PORT=free_port()),
    )
    assert 'Distributed training: True' in out
    assert 'GPU number: 2' in out  # mmengine's name for the world size
    assert 'using the gloo backend instead of nccl' in out
    assert 'SyncBatchNorm layers were converted to BatchNorm' in out
    assert 'SyncBatchNorm layers only work with GPU modules' not in out
    ckpt = osp.join(work, 'iter_1.pth')
    assert osp.exists(ckpt)
    out = run_tool(
        [
            'bash',
            'tools/dist_test.sh',
            small_config,
            ckpt,
            '2',
            '--work-dir',
            str(tmp_path / 'syncbn_test'),
            '--cfg-options',
        ]
        + syncbn
        + data_options(synthetic_root),
        env=dict(env, PORT=free_port()),
    )
    assert 'SyncBatchNorm layers were converted to BatchNorm' in out
    assert 'mIoU' in out


# A stand-in for SLURM's srun on one machine: starts --ntasks local tasks of the
# command with the environment SLURM gives them (no scontrol: MASTER_ADDR is set).
FAKE_SRUN = r"""#!/usr/bin/env bash
ntasks=1
while [ $# -gt 0 ]; do
  case "$1" in
    -p) shift 2 ;;
    --ntasks=*) ntasks=${1#--ntasks=}; shift ;;
    -*) shift ;;
    *) break ;;
  esac
done
echo "fake srun: $ntasks tasks: $*"
pids=()
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$ntasks \
    SLURM_NODELIST=localhost "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def test_slurm_test_sh_with_evaluator_sea(
    run_tool, small_config, small_checkpoint, synthetic_root, data_options, tmp_path
):
    """`tools/slurm_test.sh PARTITION JOB CONFIG CKPT --cfg-options evaluator=SEA`
    as the README writes it, on 2 CPU tasks of a stand-in srun (mmengine's slurm
    set-up without CUDA: mmseg_robust.utils.compat)."""
    import os
    import stat
    import sys

    ckpt = small_checkpoint
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    srun = bin_dir / 'srun'
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    test_work = tmp_path / 'sea'
    out = run_tool(
        [
            'bash',
            'tools/slurm_test.sh',
            'PARTITION',
            'JOB',
            small_config,
            ckpt,
            '--work-dir',
            str(test_work),
            '--cfg-options',
            'evaluator=SEA',
            'evaluator.eps=4',
            'evaluator.n_iter=4',
        ]
        + data_options(synthetic_root)
        + ['test_dataloader.dataset.indices=6'],
        env=dict(
            PATH=os.pathsep.join(
                [str(bin_dir), osp.dirname(sys.executable), os.environ['PATH']]
            ),
            GPUS='2',
            GPUS_PER_NODE='2',
            MASTER_ADDR='127.0.0.1',
            MASTER_PORT='29683',
            CUDA_VISIBLE_DEVICES='',
        ),
    )
    assert 'fake srun: 2 tasks' in out and '--launcher=slurm' in out
    assert 'Distributed launcher: slurm' in out and 'GPU number: 2' in out
    results = glob.glob(str(test_work / 'robustness_*.json'))
    assert len(results) == 1, out[-3000:]
    summary = json.load(open(results[0]))['summary']
    assert summary['num_images'] == 6  # both tasks' images, once each
    assert set(summary['eps']) == {'4'}
    worst = summary['eps']['4']['worst_case']
    assert worst['mIoU'] <= summary['clean']['mIoU']


def test_run_tool_accepts_a_teardown_abort_without_running_again(run_tool, tmp_path):
    """The tests' launcher helper: a multi-process launch that fails only by
    the gloo teardown abort (no rank raised) is accepted once, never run a
    second time (a --resume run would not start from the same state); a rank's
    exception or any other failure fails."""
    runs = tmp_path / 'runs'
    abort = "echo 'terminate called without an active exception'"
    out = run_tool(['bash', '-c', f'echo run >> {runs}; {abort}; exit 134'])
    assert out.startswith('[run_tool: teardown abort after the work, accepted]')
    assert runs.read_text() == 'run\n'
    raised = "echo '[rank1]: Traceback (most recent call last):'"
    with pytest.raises(AssertionError, match=r'failed \(1\)'):
        run_tool(['bash', '-c', f'{raised}; {abort}; exit 1'])
    with pytest.raises(AssertionError, match=r'failed \(3\)'):
        run_tool(['bash', '-c', 'exit 3'])
