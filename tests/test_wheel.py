"""The built wheel works on its own: ``pip wheel .`` of the source tree,
``pip install --no-deps --target DIR`` outside the checkout, then the wheel's
``tools/test.py`` with ``evaluator=SEA`` on the wheel's synthetic config, run with
``PYTHONPATH=DIR`` from a folder outside the checkout. The presets, the configs
and the tools come from the package (``mmseg_robust/.mim/``), and every
``mmseg_robust`` module the run imports is the wheel's.

The wheel is built from a copy of the source tree (without build outputs), so
the test leaves no ``build/`` or ``*.egg-info`` in the checkout and nothing an
earlier build left there ends up in the wheel. Offline: no build isolation, no
index (the build tools are the environment's, requirements/build.txt).
"""

import glob
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join('configs', 'synthetic', 'upernet_convnext-micro_synthetic.py')
# top-level names of the checkout that are build outputs, environments or data
_NOT_SOURCE = {
    '.git',
    '.venv',
    '.ruff_cache',
    'build',
    'dist',
    'work_dirs',
    'data',
    'benchmarks',
}


def _source_only(folder, names):
    skip = {n for n in names if n == '__pycache__' or n.endswith('.egg-info')}
    if osp.abspath(folder) == REPO:
        skip |= _NOT_SOURCE & set(names)
    return skip


def _pip(*args, cwd):
    env = dict(os.environ, PIP_NO_INDEX='1', PIP_DISABLE_PIP_VERSION_CHECK='1')
    env.pop('PYTHONPATH', None)
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f'pip {" ".join(args)} failed:\n{proc.stdout}'
    return proc.stdout


@pytest.fixture(scope='module')
def installed_wheel(tmp_path_factory):
    """The folder the wheel was installed into (``pip install --target``)."""
    tmp = tmp_path_factory.mktemp('wheel')
    source, dist, target = tmp / 'source', tmp / 'dist', tmp / 'site'
    shutil.copytree(REPO, source, ignore=_source_only, symlinks=True)
    _pip('wheel', '--no-deps', '--no-build-isolation', '-w', str(dist), '.', cwd=source)
    (wheel,) = glob.glob(str(dist / 'mmseg_robust-*.whl'))
    _pip('install', '--no-deps', '--target', str(target), wheel, cwd=tmp)
    return str(target)


def test_wheel_carries_the_configs_and_tools(installed_wheel):
    mim = osp.join(installed_wheel, 'mmseg_robust', '.mim')
    for name in ('sea.py', 'apgd.py', 'pgd.py', 'segpgd.py', 'cospgd.py'):
        assert osp.isfile(osp.join(mim, 'configs', '_base_', 'evaluators', name))
    shipped = {
        osp.relpath(p, osp.join(mim, 'configs'))
        for p in glob.glob(osp.join(mim, 'configs', '**', '*.py'), recursive=True)
    }
    in_repo = {
        osp.relpath(p, osp.join(REPO, 'configs'))
        for p in glob.glob(osp.join(REPO, 'configs', '**', '*.py'), recursive=True)
    }
    assert shipped == in_repo
    package = osp.join(installed_wheel, 'mmseg_robust')
    assert glob.glob(osp.join(package, 'attacks', 'data', '*.json'))
    assert osp.isfile(osp.join(mim, 'tools', 'test.py'))
    assert osp.isfile(osp.join(mim, 'tools', 'train.py'))
    assert osp.isfile(osp.join(mim, 'tools', 'dataset_converters', 'make_corrupted.py'))
    # the result cache's code digest counts the package's code only: a wheel
    # and the source tree it was built from give the same digest
    from mmseg_robust.engine.result_cache import source_digest

    assert source_digest(osp.join(installed_wheel, 'mmseg_robust')) == (
        source_digest(osp.join(REPO, 'mmseg_robust'))
    )


def test_evaluator_sea_from_the_installed_wheel(
    installed_wheel, synthetic_root, data_options, tmp_path
):
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    import mmseg_robust.models  # noqa: F401  (registers the models)
    from mmseg_robust.models.checkpoint import save_checkpoint
    from mmseg_robust.registry import MODELS

    mim = osp.join(installed_wheel, 'mmseg_robust', '.mim')
    config = osp.join(mim, CONFIG)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(Config.fromfile(config).model)
    checkpoint = save_checkpoint(str(tmp_path / 'model.pth'), model.state_dict(), {})
    work = tmp_path / 'work'
    argv = [
        osp.join(mim, 'tools', 'test.py'),
        config,
        checkpoint,
        '--work-dir',
        str(work),
        '--cfg-options',
        'evaluator=SEA',
        'evaluator.eps=8',
        'evaluator.steps=2',
        'test_dataloader.batch_size=2',
        *data_options(synthetic_root),
        'test_dataloader.dataset.indices=2',
    ]
    # runs the wheel's tools/test.py, then names every mmseg_robust module the
    # run imported from elsewhere than the wheel
    script = textwrap.dedent(
        f"""
        import runpy, sys
        sys.argv = {argv!r}
        runpy.run_path(sys.argv[0], run_name='__main__')
        import mmseg_robust
        from mmseg_robust.engine.presets import config_dir
        print('IMPORTED', mmseg_robust.__file__)
        print('CONFIGS', config_dir())
        outside = sorted(
            name for name, m in list(sys.modules.items())
            if name.split('.')[0] == 'mmseg_robust'
            and not (getattr(m, '__file__', None) or '').startswith({installed_wheel!r})
        )
        print('OUTSIDE', outside)
        """
    )
    run_dir = tmp_path / 'elsewhere'
    run_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=installed_wheel, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-c', script],
        cwd=run_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    lines = dict(
        line.split(' ', 1)
        for line in proc.stdout.splitlines()
        if line.startswith(('IMPORTED ', 'CONFIGS ', 'OUTSIDE '))
    )
    package = osp.join(installed_wheel, 'mmseg_robust')
    assert lines['IMPORTED'] == osp.join(package, '__init__.py')
    assert lines['CONFIGS'] == osp.join(package, '.mim', 'configs')
    assert lines['OUTSIDE'] == '[]'
    (results_file,) = glob.glob(str(work / 'robustness_*.json'))
    with open(results_file) as f:
        summary = json.load(f)['summary']
    assert summary['num_images'] == 2
    worst = summary['eps']['8']['worst_case']
    assert 0 <= worst['mIoU'] <= summary['clean']['mIoU']
