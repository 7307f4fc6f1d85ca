"""The common-corruption evaluation end to end (docs/algorithms.md section 8):
``tools/test.py CFG CKPT --cfg-options evaluator=Corruptions`` on the miniature
real-format ADE20K and Cityscapes trees with shrunk shipped configs.

A run gives the same numbers when repeated, on 2 processes of
``tools/dist_test.sh`` and after an interrupted run is resumed; a corrupted pass
equals the clean pass over a copy of the tree whose images the
``imagecorruptions`` package itself corrupted (same seed, same severity).

The models are untrained (mIoU near 0), so the tests compare the pooled
integer counts of every pass that the results file holds
(``summary['corruptions']['counts']``: intersections and unions per class,
which depend on the predictions); the head's weights are drawn large so that
the predictions depend on the image and each corruption changes the counts.
"""

import glob
import hashlib
import json
import os
import os.path as osp
import shutil

import numpy as np
import pytest
from mmengine.config import Config

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

# dataset -> the shipped config, the dataset fixture, the test images under
# data_root, the corruptions of the 2-process run (a part of the passes: the
# run's cost is mostly starting 2 processes) and the pass the package-corrupted
# copy of the tree is checked against
CASES = {
    'ade20k': dict(
        config='configs/pirat/upernet_convnext_t_ade20k.py',
        fixture='mini_ade20k',
        images='images/validation/*.jpg',
        dist=['fog'],
        oracle=('fog', 3),
    ),
    'cityscapes': dict(
        config='configs/sat/pspnet_r50-d8_sat_cityscapes-449x449.py',
        fixture='mini_cityscapes',
        images='leftImg8bit/val/*/*.png',
        dist=['impulse_noise'],
        oracle=('glass_blur', 3),
    ),
}
# impulse_noise and glass_blur take the seed as an argument (scikit-image's and
# numba's generators), fog draws from numpy's global generator.
NAMES = ['impulse_noise', 'glass_blur', 'fog']
SEVERITIES = [3]
EVALUATOR = [
    'evaluator=Corruptions',
    'evaluator.corruptions=' + ','.join(NAMES),
    'evaluator.severities=3',
]
PASSES = ['clean'] + [f'{n}/{s}' for n in NAMES for s in SEVERITIES]
NUM_IMAGES = 3


class Case:
    """A shrunk shipped config, a checkpoint of its model, the data root and
    the results of one evaluation run (the reference of the tests)."""

    def __init__(self, name, config, root, checkpoint, work_dir, matrix):
        self.name, self.config, self.root = name, config, root
        self.checkpoint, self.work_dir = checkpoint, work_dir
        self.matrix = matrix  # tests/test_real_data_matrix.py
        self.results = None

    def test_args(self, work_dir, root=None, evaluator=EVALUATOR):
        """tools/test.py's arguments: the config, the checkpoint, the work
        dir, the data root (default: the miniature tree), the evaluator."""
        cfg = Config.fromfile(self.config)
        return [
            self.config,
            self.checkpoint,
            '--work-dir',
            str(work_dir),
            '--cfg-options',
            *self.matrix.data_root_options(cfg, root or self.root),
            *evaluator,
        ]

    def run(self, tools, args):
        """tools/test.py ARGS in this process (tests/tools_in_one_process.py)."""
        self.matrix._run_tools(tools, [osp.join(REPO, 'tools', 'test.py'), *args])

    def log(self, work_dir):
        return self.matrix._log_text(work_dir)


def _checkpoint(config, path):
    """The config's model, seeded, with large classifier weights of zero mean
    (a random head predicts one class nearly everywhere: its logits are near
    zero, and the features' common part decides them)."""
    import torch
    from mmengine.registry import DefaultScope

    from mmseg_robust.registry import MODELS

    with DefaultScope.overwrite_default_scope('mmseg'):
        torch.manual_seed(0)
        model = MODELS.build(Config.fromfile(config).model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'conv_seg' in name and name.endswith('weight'):
                # zero mean over the input channels: the part the features
                # (after ReLU) share at every pixel adds the same to all logits
                param.normal_(0, 1)
                param -= param.mean(1, keepdim=True)
    torch.save(dict(state_dict=model.state_dict(), meta={}), path)
    return str(path)


def _results(work_dir):
    files = sorted(glob.glob(osp.join(str(work_dir), 'robustness_*.json')))
    assert len(files) == 1, files
    with open(files[0]) as f:
        return json.load(f)


def _numbers(results):
    """Everything a run computed, as text (NaN compares equal)."""
    return json.dumps(
        dict(summary=results['summary'], metrics=results['metrics']), sort_keys=True
    )


def _cache_files(work_dir):
    return sorted(glob.glob(osp.join(str(work_dir), 'robustness_cache', '*', '*')))


@pytest.fixture(scope='module', params=list(CASES))
def case(request, tmp_path_factory, real_data_matrix, tools_in_one_process):
    """One evaluation run per dataset, shared by the tests of this module."""
    rel = CASES[request.param]['config']
    root = request.getfixturevalue(CASES[request.param]['fixture'])
    tmp = tmp_path_factory.mktemp(f'corruptions_{request.param}')
    base = osp.join(REPO, rel)
    cfg = Config.fromfile(base)
    config = real_data_matrix.write_child(
        tmp, base, osp.basename(rel), real_data_matrix._model_shrink(cfg)
    )
    checkpoint = _checkpoint(config, tmp / 'model.pth')
    case = Case(
        request.param, config, root, checkpoint, tmp / 'first', real_data_matrix
    )
    case.run(tools_in_one_process, case.test_args(case.work_dir))
    case.results = _results(case.work_dir)
    return case


def test_evaluator_corruptions_runs_and_repeats_exactly(
    case, tmp_path, tools_in_one_process
):
    first = case.results
    summary = first['summary']
    counts = summary['corruptions']['counts']
    assert list(counts) == PASSES
    assert summary['num_images'] == NUM_IMAGES
    assert all(c['images'] == NUM_IMAGES for c in counts.values())
    assert first['corruptions']['names'] == NAMES
    assert first['corruptions']['severities'] == SEVERITIES
    assert first['corruptions']['seed'] == 0
    assert 'imagecorruptions-imaug' in first['corruptions']['libraries']
    assert list(summary['corruptions']['per_corruption']) == NAMES
    assert summary['corruptions']['mPC_corruptions'] == NAMES
    assert first['metrics']['corruptions/mPC/mIoU'] == round(
        summary['corruptions']['mPC']['mIoU'], 2
    )
    # the corruption reaches the model: every pass predicts differently (the
    # unions hold the predicted areas), the labels are the same
    for name in PASSES[1:]:
        assert counts[name]['label_area'] == counts['clean']['label_area']
    unions = [json.dumps(counts[name]['union']) for name in PASSES]
    assert len(set(unions)) == len(PASSES), unions
    log = case.log(case.work_dir)
    assert f'{len(PASSES)} passes over {NUM_IMAGES} images on this rank' in log
    assert 'restored' not in log
    assert 'mIoU (aAcc), percent' in log and 'Corruption results written to' in log

    # the same command again (with --out DIR: the results file goes there)
    work, out = tmp_path / 'work', tmp_path / 'out'
    args = case.test_args(work)
    case.run(tools_in_one_process, args[:4] + ['--out', str(out)] + args[4:])
    again = _results(out)
    assert not glob.glob(str(work / 'robustness_*.json'))
    assert 'images' not in again  # pooled counts only
    assert _numbers(again) == _numbers(first)


def test_interrupted_run_resumes_to_the_same_numbers(
    case, tmp_path, tools_in_one_process
):
    """A run killed while writing: its cache's last lines are gone, the last
    one left is cut in half, and one line was edited; the same command in the
    same work dir restores the rest and computes those again."""
    from mmseg_robust.engine.result_cache import ResultCache

    work = tmp_path / 'work'
    shutil.copytree(
        case.work_dir,
        work,
        ignore=lambda d, names: (
            [n for n in names if n != 'robustness_cache']
            if d == str(case.work_dir)
            else []
        ),
    )
    (path,) = _cache_files(work)[1:]  # meta.json, rank0.jsonl
    assert path.endswith('rank0.jsonl')
    lines = open(path).read().splitlines(keepends=True)
    assert len(lines) == len(PASSES) * NUM_IMAGES
    kept = lines[:7]
    edited = json.loads(kept[2])
    edited['counts']['intersect'][0] += 1  # checksum left as it was
    kept[2] = json.dumps(edited) + '\n'
    with open(path, 'w') as f:
        f.write(''.join(kept[:-1]) + kept[-1][: len(kept[-1]) // 2])

    with pytest.warns(UserWarning, match='invalid robustness cache line'):
        case.run(tools_in_one_process, case.test_args(work))
    log = case.log(work)
    assert '5 image passes restored from' in log, log[-3000:]
    assert _numbers(_results(work)) == _numbers(case.results)
    cache = ResultCache(osp.dirname(path))
    assert sum(len(u) for u in cache.units.values()) == len(PASSES) * NUM_IMAGES
    assert cache.invalid and 'checksum mismatch' in cache.invalid[0]


def test_dist_test_with_2_processes_equals_1(case, tmp_path, run_tool, free_port):
    """tools/dist_test.sh with 2 CPU processes (gloo) on some of the passes:
    the images are split over the ranks (2 + 1), the counts summed; each pass
    has the counts of the 1-process run, and the numbers are those of these
    passes of it."""
    from mmseg_robust.evaluation import summarize_corruptions

    names = CASES[case.name]['dist']
    evaluator = EVALUATOR[:1] + ['evaluator.corruptions=' + ','.join(names)]
    evaluator += EVALUATOR[2:]
    out = run_tool(
        ['bash', 'tools/dist_test.sh', case.config, case.checkpoint, '2']
        + case.test_args(tmp_path, evaluator=evaluator)[2:],
        env=dict(CUDA_VISIBLE_DEVICES='', PORT=free_port()),
    )
    assert 'Distributed training: True' in out
    summary = _results(tmp_path)['summary']
    passes = ['clean'] + [f'{n}/{s}' for n in names for s in SEVERITIES]
    reference = case.results['summary']['corruptions']['counts']
    assert summary['corruptions']['counts'] == {p: reference[p] for p in passes}
    expected = summarize_corruptions(
        {p: reference[p] for p in passes}, names, SEVERITIES
    )
    assert json.dumps(summary, sort_keys=True) == json.dumps(expected, sort_keys=True)
    ranks = {osp.basename(p): p for p in _cache_files(tmp_path)}
    assert sorted(ranks) == ['meta.json', 'rank0.jsonl', 'rank1.jsonl']
    per_rank = [len(open(ranks[f'rank{r}.jsonl']).readlines()) for r in (0, 1)]
    assert per_rank == [2 * len(passes), 1 * len(passes)]


def _seed(path, corruption, severity, run_seed=0):
    """The documented seed: BLAKE2b (32 bits, little endian) of
    ``'<run seed>|<file name>|<corruption>|<severity>'``."""
    text = f'{run_seed}|{osp.basename(path)}|{corruption}|{severity}'
    digest = hashlib.blake2b(text.encode(), digest_size=4).digest()
    return int.from_bytes(digest, 'little')


def test_corrupted_pass_is_the_clean_pass_of_the_package_corrupted_images(
    case, tmp_path, tools_in_one_process
):
    """The tree copied with each test image replaced by the package's own
    corruption of it (as loaded: BGR from mmcv, corrupted in RGB; written
    losslessly under its name): its clean pass has the counts of the
    corrupted pass of the original tree, so the corruption is applied to the
    image as loaded, before the resize, with the documented seed."""
    import cv2
    import imagecorruptions
    import mmcv

    pattern = CASES[case.name]['images']
    name, severity = CASES[case.name]['oracle']
    root = tmp_path / 'data'
    shutil.copytree(case.root, root)
    images = sorted(glob.glob(osp.join(str(root), pattern)))
    assert len(images) == NUM_IMAGES
    state = np.random.get_state()
    try:
        for path in images:
            rgb = np.ascontiguousarray(mmcv.imread(path)[..., ::-1])
            seed = _seed(path, name, severity)
            np.random.seed(seed)
            kwargs = dict(seed=seed) if name in ('impulse_noise', 'glass_blur') else {}
            out = imagecorruptions.corrupt(
                rgb, severity=severity, corruption_name=name, **kwargs
            )
            ok, png = cv2.imencode('.png', np.ascontiguousarray(out[..., ::-1]))
            assert ok
            with open(path, 'wb') as f:  # PNG bytes: cv2 decodes by content
                f.write(png.tobytes())
    finally:
        np.random.set_state(state)
    work = tmp_path / 'work'
    evaluator = ['evaluator=Corruptions', 'evaluator.corruptions=fog']
    evaluator += ['evaluator.severities=1']
    case.run(tools_in_one_process, case.test_args(work, str(root), evaluator))
    copy = _results(work)['summary']['corruptions']['counts']
    original = case.results['summary']['corruptions']['counts']
    assert copy['clean'] == original[f'{name}/{severity}']
    assert copy['clean'] != original['clean']
    assert os.listdir(case.root)  # the original tree is untouched
