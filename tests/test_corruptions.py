"""The common corruptions at the unit level (docs/algorithms.md section 8): the
corrupted images against the ``imagecorruptions`` package's own output, their
seeds (reproducible, restoring numpy's global generator), the channel order,
grayscale and small images, the missing package, the names and severities
accepted, the ``evaluator=Corruptions`` options, the cache's corruption units,
and mPC/rPC against the formula of mmdet's ``robustness_eval.py``."""

import hashlib
import json
import os.path as osp
import sys

import numpy as np
import pytest

from mmseg_robust.datasets import corruptions as C
from mmseg_robust.datasets.corruptions import (
    BENCHMARK_CORRUPTIONS,
    CATEGORIES,
    CORRUPTIONS,
    Corrupt,
    corrupt_image,
    corruption_seed,
    resolve_corruptions,
    resolve_severities,
    with_corruption,
)

imagecorruptions = pytest.importorskip('imagecorruptions')

# The corruptions that draw random numbers (the package's code: noise layers,
# glass_blur's pixel shuffles, motion_blur's and snow's angles, frost's file and
# crop, fog's plasma fractal, spatter's liquid layer, elastic_transform's
# displacements); the other 8 are deterministic functions of the image.
RANDOM = {
    'gaussian_noise',
    'shot_noise',
    'impulse_noise',
    'speckle_noise',
    'glass_blur',
    'motion_blur',
    'snow',
    'frost',
    'fog',
    'spatter',
    'elastic_transform',
}


def _image(h=40, w=48, seed=0):
    """A small uint8 colour image: smooth ramps (so blurs, fog and contrast
    change it) plus texture, with different channels (so the order matters)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([4 * xx, 5 * yy, 255 - 3 * (xx + yy)], axis=-1)
    img = base + rng.normal(0, 20, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _package(rgb, name, severity, seed):
    """The package's own output for ``seed``: its global numpy generator
    seeded, and the seed argument of the two corruptions that take one."""
    np.random.seed(seed)
    kwargs = {'seed': seed} if name in ('impulse_noise', 'glass_blur') else {}
    return imagecorruptions.corrupt(
        rgb, severity=severity, corruption_name=name, **kwargs
    )


def _seed(run_seed, path, name, severity):
    """The documented seed of an image: BLAKE2b (32 bits, little endian) of
    ``'<run seed>|<file name>|<corruption>|<severity>'``."""
    text = f'{run_seed}|{osp.basename(path)}|{name}|{severity}'
    digest = hashlib.blake2b(text.encode(), digest_size=4).digest()
    return int.from_bytes(digest, 'little')


# ------------------------------------------------------------------- names
def test_names_and_categories_are_the_packages():
    get = imagecorruptions.get_corruption_names
    assert CORRUPTIONS == get('all')
    assert BENCHMARK_CORRUPTIONS == get('common')
    assert CATEGORIES['holdout'] == get('validation')
    for category in ('noise', 'blur', 'weather', 'digital'):
        assert CATEGORIES[category] == get(category)


def test_resolve_corruptions():
    assert resolve_corruptions('benchmark') == BENCHMARK_CORRUPTIONS
    assert len(resolve_corruptions('benchmark')) == 15
    assert resolve_corruptions('all') == CORRUPTIONS
    assert len(resolve_corruptions('all')) == 19
    assert resolve_corruptions('holdout') == [
        'speckle_noise',
        'gaussian_blur',
        'spatter',
        'saturate',
    ]
    assert resolve_corruptions('benchmark,holdout') == CORRUPTIONS
    # names, categories, comma text and lists (as --cfg-options parses them):
    # the package's order, no duplicates
    assert resolve_corruptions('fog') == ['fog']
    assert resolve_corruptions('fog, noise') == [
        'gaussian_noise',
        'shot_noise',
        'impulse_noise',
        'fog',
    ]
    assert resolve_corruptions(['fog', 'glass_blur', 'fog', 'blur']) == [
        'defocus_blur',
        'glass_blur',
        'motion_blur',
        'zoom_blur',
        'fog',
    ]
    assert resolve_corruptions(('digital',)) == CATEGORIES['digital']
    with pytest.raises(ValueError, match="unknown corruption 'fogg'.*benchmark"):
        resolve_corruptions('fog,fogg')
    with pytest.raises(ValueError, match='no corruption given'):
        resolve_corruptions(' , ')
    with pytest.raises(ValueError, match='no corruption given'):
        resolve_corruptions([])


def test_resolve_severities():
    assert resolve_severities(3) == [3]
    assert resolve_severities(np.int64(2)) == [2]
    assert resolve_severities('1, 3') == [1, 3]
    assert resolve_severities([5, 1, 5, 2]) == [1, 2, 5]
    assert resolve_severities((1, 2, 3, 4, 5)) == [1, 2, 3, 4, 5]
    assert resolve_severities([2.0, '4']) == [2, 4]
    for bad in (0, 6, [1, 6], '1,x', [], '', [1.5], True, '1.5'):
        with pytest.raises(ValueError, match='severities must be integers in 1..5'):
            resolve_severities(bad)


# ------------------------------------------------------ images and seeds
def test_seed_is_the_documented_hash_of_file_name_corruption_severity():
    got = corruption_seed(0, '/data/a/ADE_val_00000001.jpg', 'fog', 3)
    assert got == _seed(0, 'ADE_val_00000001.jpg', 'fog', 3)
    # the folder does not matter (other data roots, machines), the rest does
    assert got == corruption_seed(0, 'elsewhere/ADE_val_00000001.jpg', 'fog', 3)
    others = {
        corruption_seed(1, 'ADE_val_00000001.jpg', 'fog', 3),
        corruption_seed(0, 'ADE_val_00000002.jpg', 'fog', 3),
        corruption_seed(0, 'ADE_val_00000001.jpg', 'snow', 3),
        corruption_seed(0, 'ADE_val_00000001.jpg', 'fog', 4),
    }
    assert got not in others and len(others) == 4


@pytest.mark.parametrize('name', CORRUPTIONS)
def test_each_corruption_equals_the_package_and_is_reproducible(name):
    """For each of the 19: Corrupt on the BGR image as mmcv loads it is the
    package's output on the RGB image (seeded as documented), flipped back; the
    same seed gives the same image whatever numpy's global state; another
    severity changes it; another seed or file name changes the random ones
    only."""
    rgb = _image()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    path = '/data/img/0001.png'
    seed = _seed(7, path, name, 2)
    expected = _package(rgb, name, 2, seed)[..., ::-1]

    def corrupt(img_path=path, severity=2, seed=7):
        np.random.seed(len(img_path) + severity)  # any global state
        results = Corrupt(name, severity, seed=seed).transform(
            dict(img=bgr.copy(), img_path=img_path)
        )
        assert results['corruption'] == (name, severity)
        return results['img']

    out = corrupt()
    assert out.dtype == np.uint8 and out.shape == bgr.shape
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(corrupt(), out)
    # another data root: the same image
    np.testing.assert_array_equal(corrupt(img_path='/other/root/0001.png'), out)
    assert not np.array_equal(corrupt(severity=3), out)
    random = name in RANDOM
    assert (not np.array_equal(corrupt(seed=8), out)) == random
    assert (not np.array_equal(corrupt(img_path='/data/img/0002.png'), out)) == random
    # the image really is corrupted
    assert not np.array_equal(out, bgr)


def test_global_numpy_state_is_restored():
    img = _image()
    np.random.seed(123)
    state = np.random.get_state()
    for name in ('fog', 'gaussian_noise', 'impulse_noise', 'glass_blur'):
        corrupt_image(img, name, 3, seed=5)
    after = np.random.get_state()
    assert after[0] == state[0]
    np.testing.assert_array_equal(after[1], state[1])
    assert after[2:] == state[2:]
    np.random.seed(123)
    expected = np.random.random(4)
    np.random.set_state(after)
    np.testing.assert_array_equal(np.random.random(4), expected)


def test_global_numpy_state_is_restored_when_the_package_fails(monkeypatch):
    def failing(image, **kwargs):
        np.random.random(100)
        raise RuntimeError('inside the package')

    monkeypatch.setattr(imagecorruptions, 'corrupt', failing)
    np.random.seed(9)
    state = np.random.get_state()
    with pytest.raises(RuntimeError, match='inside the package'):
        corrupt_image(_image(), 'fog', 1, seed=1)
    np.testing.assert_array_equal(np.random.get_state()[1], state[1])
    assert np.random.get_state()[2] == state[2]


@pytest.mark.parametrize('name', ['frost', 'snow', 'saturate'])
def test_channel_order(name):
    """The package corrupts RGB images (frost's and snow's layers, saturation
    are colour dependent): a BGR image is flipped to RGB and back, an RGB one
    is passed as is; corrupting the BGR array as if it were RGB is not the
    same."""
    rgb = _image()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    seed = 11
    expected_rgb = _package(rgb, name, 3, seed)
    np.testing.assert_array_equal(
        corrupt_image(bgr, name, 3, seed, channel_order='bgr'), expected_rgb[..., ::-1]
    )
    np.testing.assert_array_equal(
        corrupt_image(rgb, name, 3, seed, channel_order='rgb'), expected_rgb
    )
    naive = _package(bgr, name, 3, seed)
    assert not np.array_equal(naive, expected_rgb[..., ::-1])
    with pytest.raises(ValueError, match="channel_order must be 'bgr' or 'rgb'"):
        corrupt_image(rgb, name, 3, seed, channel_order='RGB ')


@pytest.mark.parametrize('name', ['fog', 'impulse_noise', 'frost'])
def test_grayscale_image(name):
    """An HxW image (LoadImageFromFile with color_type='grayscale') is
    corrupted as its 3-channel copy, of which one channel is returned."""
    gray = _image()[..., 1].copy()
    out = corrupt_image(gray, name, 2, seed=3)
    assert out.shape == gray.shape and out.dtype == np.uint8
    expected = _package(np.stack([gray] * 3, axis=-1), name, 2, 3)[..., 0]
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(out, gray)


def test_bad_images_are_refused_clearly():
    with pytest.raises(ValueError, match='at least 32x32 pixels, got 48x31'):
        corrupt_image(_image(31, 48), 'fog', 1, seed=0)
    with pytest.raises(ValueError, match='at least 32x32 pixels, got 31x40'):
        Corrupt('fog', 1).transform(dict(img=_image(40, 31), img_path='a.png'))
    np.testing.assert_array_equal(  # 32 is enough
        corrupt_image(_image(32, 32), 'fog', 1, seed=0),
        _package(_image(32, 32)[..., ::-1].copy(), 'fog', 1, 0)[..., ::-1],
    )
    with pytest.raises(ValueError, match='uint8 images as loaded.*to_float32'):
        corrupt_image(_image().astype(np.float32), 'fog', 1, seed=0)
    with pytest.raises(ValueError, match='HxW or HxWx3'):
        corrupt_image(np.zeros((40, 40, 4), np.uint8), 'fog', 1, seed=0)
    with pytest.raises(ValueError, match="unknown corruption 'smog'"):
        corrupt_image(_image(), 'smog', 1, seed=0)
    with pytest.raises(ValueError, match='severity must be in 1..5'):
        Corrupt('fog', 0)
    with pytest.raises(ValueError, match='needs img_path'):
        Corrupt('fog', 1).transform(dict(img=_image()))


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'imagecorruptions', None)
    hint = r"pip install 'mmseg_robust\[corruptions\]'"
    with pytest.raises(ImportError, match=hint):
        corrupt_image(_image(), 'fog', 1, seed=0)
    with pytest.raises(ImportError, match=hint):
        Corrupt('fog', 1)
    with pytest.raises(ImportError, match=hint):
        C.corruption_package()


def test_with_corruption_goes_right_after_the_image_loading():
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets.transforms import LoadAnnotations, PackSegInputs

    from mmseg_robust.registry import TRANSFORMS

    resize = TRANSFORMS.build(dict(type='Resize', scale=(64, 64), keep_ratio=True))
    pipeline = [LoadImageFromFile(), resize, LoadAnnotations(), PackSegInputs()]
    out = with_corruption(pipeline, 'fog', 4, seed=2)
    assert [type(t).__name__ for t in out] == [
        'LoadImageFromFile',
        'Corrupt',
        'Resize',
        'LoadAnnotations',
        'PackSegInputs',
    ]
    corrupt = out[1]
    assert (corrupt.corruption, corrupt.severity, corrupt.seed) == ('fog', 4, 2)
    assert corrupt.channel_order == 'bgr'
    assert out[0] is pipeline[0] and len(pipeline) == 4  # the input is kept
    # a config's pipeline can name it (mmseg's registry)
    built = TRANSFORMS.build(dict(type='Corrupt', corruption='fog', severity=2))
    assert repr(built) == repr(Corrupt('fog', 2))
    with pytest.raises(ValueError, match='drop to_float32'):
        with_corruption([LoadImageFromFile(to_float32=True)], 'fog', 1)
    with pytest.raises(ValueError, match='no image loading transform'):
        with_corruption([resize, PackSegInputs()], 'fog', 1)


# ------------------------------------------------------------ the presets
def _preset(*options):
    """The config tools/test.py makes of ``--cfg-options OPTIONS``."""
    import argparse

    from mmengine.config import Config, DictAction

    from mmseg_robust.engine import (
        apply_robustness_evaluator,
        normalize_evaluator_options,
    )

    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    parsed = parser.parse_args(['--cfg-options', *options]).cfg_options
    cfg = Config(
        dict(
            model=dict(decode_head=dict(num_classes=4)),
            test_dataloader=dict(dataset=dict(type='ADE20KDataset')),
            test_cfg=dict(type='TestLoop'),
            test_evaluator=dict(type='IoUMetric'),
        )
    )
    cfg.merge_from_dict(normalize_evaluator_options(parsed))
    return apply_robustness_evaluator(cfg)


def test_corruptions_preset_and_its_options():
    from mmseg_robust.engine import is_corruption_evaluation

    cfg = _preset('evaluator=Corruptions')
    assert is_corruption_evaluation(cfg)
    assert cfg.test_cfg.to_dict() == dict(
        type='CorruptionTestLoop',
        corruptions='benchmark',
        severities=[1, 2, 3, 4, 5],
        seed=0,
        resume=True,
        log_interval=50,
    )
    assert cfg.test_evaluator.to_dict() == dict(type='CorruptionMetric')
    assert 'evaluator' not in cfg
    cfg = _preset(
        'evaluator=Corruptions',
        'evaluator.corruptions=noise,glass_blur,fog',
        'evaluator.severities=[3,1]',
        'evaluator.seed=4',
        'evaluator.resume=False',
        'evaluator.data_digest=content',
    )
    assert cfg.test_cfg.to_dict() == dict(
        type='CorruptionTestLoop',
        corruptions=['gaussian_noise', 'shot_noise', 'impulse_noise']
        + ['glass_blur', 'fog'],
        severities=[1, 3],
        seed=4,
        resume=False,
        log_interval=50,
        data_digest='content',
    )
    cfg = _preset(
        'evaluator=Corruptions', 'evaluator.corruptions=all', 'evaluator.severities=2'
    )
    assert cfg.test_cfg.corruptions == CORRUPTIONS and cfg.test_cfg.severities == [2]


def test_preset_options_are_refused_where_they_do_not_belong():
    with pytest.raises(ValueError, match=r"does not take \['eps'\].*corruptions"):
        _preset('evaluator=Corruptions', 'evaluator.eps=4')
    with pytest.raises(ValueError, match=r"does not take \['n_iter', 'steps'\]"):
        _preset('evaluator=Corruptions', 'evaluator.steps=4', 'evaluator.n_iter=4')
    with pytest.raises(ValueError, match='options of evaluator=Corruptions, not of'):
        _preset('evaluator=SEA', 'evaluator.corruptions=fog')
    with pytest.raises(ValueError, match='options of evaluator=Corruptions, not of'):
        _preset('evaluator=PGD', 'evaluator.severities=[1]')
    with pytest.raises(ValueError, match="unknown corruption 'smog'"):
        _preset('evaluator=Corruptions', 'evaluator.corruptions=smog')
    with pytest.raises(ValueError, match='severities must be integers in 1..5'):
        _preset('evaluator=Corruptions', 'evaluator.severities=[0,1]')
    with pytest.raises(ValueError, match='data_digest must be one of'):
        _preset('evaluator=Corruptions', 'evaluator.data_digest=md5')


def test_tta_and_show_are_refused_with_corruptions():
    from mmseg_robust.engine import configure_test

    with pytest.raises(SystemExit, match='--tta is not supported with evaluator=C'):
        configure_test(_preset('evaluator=Corruptions'), tta=True)
    with pytest.raises(SystemExit, match='--show/--show-dir are not supported'):
        configure_test(_preset('evaluator=Corruptions'), show_dir='out')
    cfg = _preset('evaluator=Corruptions')
    assert configure_test(cfg) is True
    assert cfg.custom_hooks[-1]['type'] == 'CheckpointCheckHook'


# -------------------------------------------------------------- the cache
def _counts(rng, num_classes, present):
    """Counts of one prediction with classes ``present`` only (a consistent
    triple: intersect <= label area <= union)."""
    inter, union, area = (np.zeros(num_classes, np.int64) for _ in range(3))
    for c in present:
        inter[c] = rng.integers(0, 50)
        area[c] = inter[c] + rng.integers(0, 50)
        union[c] = area[c] + rng.integers(1, 50)
    return dict(
        intersect=inter.tolist(),
        union=union.tolist(),
        label_area=area.tolist(),
        correct=int(inter.sum()),
        valid=int(area.sum()),
    )


def test_cache_corruption_units_round_trip_sparse(tmp_path):
    from mmseg_robust.engine.result_cache import ResultCache, dense_counts

    rng = np.random.default_rng(0)
    folder = str(tmp_path / 'cache')
    cache = ResultCache(folder)
    a, b = _counts(rng, 150, [0, 7, 149]), _counts(rng, 150, [3])
    clean = _counts(rng, 150, [1, 2])
    cache.put_corruption_units('clean', 0, {'a.jpg': clean}, {'a.jpg': 'S'})
    cache.put_corruption_units('fog', 3, {'a.jpg': a, 'b.jpg': b}, {'a.jpg': 'S'})
    lines = [json.loads(x) for x in open(cache.path).read().splitlines()]
    assert len(lines) == 3
    # sparse: only the classes with a non-zero union are written
    assert lines[1]['unit'] == dict(corruption='fog', severity=3)
    assert lines[1]['counts']['classes'] == [0, 7, 149]
    assert lines[1]['counts']['num_classes'] == 150
    assert len(lines[1]['counts']['union']) == 3
    assert dense_counts(lines[2]['counts']) == b
    reopened = ResultCache(folder)
    assert reopened.get_corruption_unit('a.jpg', 'fog', 3, data='S') == a
    assert reopened.get_corruption_unit('a.jpg', 'clean', 0, data='S') == clean
    assert reopened.get_corruption_unit('b.jpg', 'fog', 3) == b
    assert reopened.get_corruption_unit('a.jpg', 'fog', 3, data='T') is None
    assert reopened.get_corruption_unit('a.jpg', 'fog', 2) is None
    assert reopened.get_corruption_unit('b.jpg', 'clean', 0) is None
    assert reopened.invalid == []


def test_cache_edited_corruption_unit_is_ignored(tmp_path):
    from mmseg_robust.engine.result_cache import ResultCache, _checksum

    rng = np.random.default_rng(1)
    folder = str(tmp_path / 'cache')
    cache = ResultCache(folder)
    units = {f'{i}.png': _counts(rng, 19, [i, i + 5]) for i in range(4)}
    cache.put_corruption_units('impulse_noise', 1, units)
    lines = open(cache.path).read().splitlines()
    edited = [json.loads(x) for x in lines]
    # 0.png: a count edited by hand (checksum left): a mismatch
    edited[0]['counts']['intersect'][0] += 1
    # 1.png: edited, checksum made to match, but intersect > union now
    edited[1]['counts']['intersect'][0] = edited[1]['counts']['union'][0] + 1
    edited[1]['sum'] = _checksum(edited[1])
    # 2.png: a class index outside num_classes, checksum made to match
    edited[2]['counts']['classes'][1] = 19
    edited[2]['sum'] = _checksum(edited[2])
    with open(cache.path, 'w') as f:
        for line in edited:
            f.write(json.dumps(line) + '\n')
        f.write(lines[0][: len(lines[0]) // 2])  # a line cut by a kill
    with pytest.warns(UserWarning, match='invalid robustness cache line') as caught:
        reopened = ResultCache(folder)
    messages = [str(w.message) for w in caught]
    assert len(reopened.invalid) == 3, messages
    assert 'checksum mismatch' in reopened.invalid[0] and '0.png' in reopened.invalid[0]
    assert 'impulse_noise 1' in reopened.invalid[1] and '1.png' in reopened.invalid[1]
    assert 'outside [0, num_classes)' in reopened.invalid[2]
    for key in ('0.png', '1.png', '2.png'):
        assert reopened.get_corruption_unit(key, 'impulse_noise', 1) is None
    assert reopened.get_corruption_unit('3.png', 'impulse_noise', 1) == units['3.png']
    # the cut line is dropped from the file, the next line starts on its own
    assert open(reopened.path).read().endswith('\n')


# ----------------------------------------------------------- mPC and rPC
def _oracle_scores(counts):
    """mIoU, aAcc, mAcc (percent) of pooled counts, as mmseg's IoUMetric."""
    inter, union, area = (
        np.asarray(counts[k], np.float64) for k in ('intersect', 'union', 'label_area')
    )
    iou = inter[union > 0] / union[union > 0]
    acc = inter[area > 0] / area[area > 0]
    return np.array([iou.mean(), inter.sum() / area.sum(), acc.mean()]) * 100


def _constructed_counts(corruptions, severities, seed=0, num_classes=6):
    """Pooled counts of a clean pass and of every corruption x severity pass,
    worse with the severity (more wrong pixels), each pass different."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, num_classes, 5000)
    out = {}
    for name in ['clean'] + [f'{c}/{s}' for c in corruptions for s in severities]:
        s = 0 if name == 'clean' else int(name.split('/')[1])
        pred = label.copy()
        wrong = rng.random(label.size) < 0.1 + 0.12 * s * rng.random()
        pred[wrong] = rng.integers(0, num_classes, int(wrong.sum()))
        inter = np.bincount(label[pred == label], minlength=num_classes)
        area = np.bincount(label, minlength=num_classes)
        union = area + np.bincount(pred, minlength=num_classes) - inter
        out[name] = dict(
            intersect=inter.tolist(),
            union=union.tolist(),
            label_area=area.tolist(),
            correct=int(inter.sum()),
            valid=int(area.sum()),
            images=3,
        )
    return out


def _mmdet_results(counts, corruptions, severities):
    """mmdet's ``results[corruption, severity, metric]`` (severity 0: clean),
    over the 19 corruptions in the package's order; nan where not evaluated."""
    results = np.full((19, 6, 3), np.nan)
    for i, name in enumerate(CORRUPTIONS):
        results[i, 0] = _oracle_scores(counts['clean'])
        if name in corruptions:
            for s in severities:
                results[i, s] = _oracle_scores(counts[f'{name}/{s}'])
    return results


def _as_array(scores):
    return np.array([scores['mIoU'], scores['aAcc'], scores['mAcc']])


def test_mpc_and_rpc_are_mmdets_on_all_corruptions_and_severities():
    from mmseg_robust.evaluation import summarize_corruptions

    severities = [1, 2, 3, 4, 5]
    counts = _constructed_counts(CORRUPTIONS, severities)
    summary = summarize_corruptions(counts, CORRUPTIONS, severities)
    results = _mmdet_results(counts, CORRUPTIONS, severities)
    # mmdet's tools/analysis_tools/robustness_eval.py
    P = results[0, 0, :]
    mPC = np.mean(results[:15, 1:, :], axis=(0, 1))  # aggregate='benchmark'
    rPC = mPC / P
    mPC_all = np.mean(results[:, 1:, :], axis=(0, 1))  # aggregate='all'
    rPC_all = mPC_all / P
    corr = summary['corruptions']
    np.testing.assert_allclose(_as_array(summary['clean']), P, rtol=1e-12)
    np.testing.assert_allclose(_as_array(corr['mPC']), mPC, rtol=1e-12)
    np.testing.assert_allclose(_as_array(corr['rPC']), 100 * rPC, rtol=1e-12)
    np.testing.assert_allclose(_as_array(corr['mPC_all']), mPC_all, rtol=1e-12)
    np.testing.assert_allclose(_as_array(corr['rPC_all']), 100 * rPC_all, rtol=1e-12)
    assert corr['mPC_corruptions'] == BENCHMARK_CORRUPTIONS
    assert summary['num_images'] == 3
    for i, name in enumerate(CORRUPTIONS):
        res = corr['per_corruption'][name]
        for s in severities:
            np.testing.assert_allclose(
                _as_array(res['severity'][str(s)]), results[i, s], rtol=1e-12
            )
        np.testing.assert_allclose(
            _as_array(res['mean']), results[i, 1:].mean(0), rtol=1e-12
        )
    for category, names in CATEGORIES.items():
        rows = [CORRUPTIONS.index(n) for n in names]
        np.testing.assert_allclose(
            _as_array(corr['per_category'][category]),
            results[rows, 1:].mean((0, 1)),
            rtol=1e-12,
        )
    # the numbers differ between corruptions (the oracle can tell them apart)
    assert len({round(x, 9) for x in results[:, 1:, 0].ravel()}) > 50


@pytest.mark.parametrize(
    'corruptions, severities',
    [
        (['impulse_noise', 'glass_blur', 'fog'], [1, 3]),
        (['shot_noise', 'pixelate', 'spatter', 'saturate'], [2, 5]),
        (['speckle_noise', 'gaussian_blur'], [4]),  # held-out only: no mPC
    ],
)
def test_mpc_and_rpc_over_the_evaluated_corruptions_and_severities(
    corruptions, severities
):
    """A subset: mmdet's means over the evaluated corruptions (the benchmark
    ones for mPC) and severities."""
    from mmseg_robust.evaluation import summarize_corruptions

    counts = _constructed_counts(corruptions, severities, seed=3)
    summary = summarize_corruptions(counts, corruptions, severities)
    results = _mmdet_results(counts, corruptions, severities)
    P = results[0, 0, :]
    bench = [CORRUPTIONS.index(c) for c in corruptions if c in BENCHMARK_CORRUPTIONS]
    every = [CORRUPTIONS.index(c) for c in corruptions]
    corr = summary['corruptions']
    assert corr['severities'] == severities
    assert list(corr['per_corruption']) == corruptions
    if bench:
        mPC = np.mean(results[bench][:, severities, :], axis=(0, 1))
        np.testing.assert_allclose(_as_array(corr['mPC']), mPC, rtol=1e-12)
        np.testing.assert_allclose(_as_array(corr['rPC']), 100 * mPC / P, rtol=1e-12)
    else:
        assert corr['mPC'] is None and corr['rPC'] is None
        assert corr['mPC_corruptions'] == []
    mPC_all = np.mean(results[every][:, severities, :], axis=(0, 1))
    np.testing.assert_allclose(_as_array(corr['mPC_all']), mPC_all, rtol=1e-12)
    np.testing.assert_allclose(
        _as_array(corr['rPC_all']), 100 * mPC_all / P, rtol=1e-12
    )
    assert set(corr['per_category']) == {C.category_of(c) for c in corruptions}


def test_counts_of_ranks_are_summed_per_pass():
    """What the metric gets from each rank (a part of the images' counts) sums
    to the counts of all images, and scores as them."""
    from mmseg_robust.evaluation import summarize_corruptions
    from mmseg_robust.evaluation.corruption_metric import sum_counts

    names = ['fog', 'impulse_noise']
    parts = [_constructed_counts(names, [2], seed=s) for s in (0, 1, 2)]
    total = sum_counts(parts)
    for name, c in total.items():
        for k in ('intersect', 'union', 'label_area'):
            assert c[k] == np.sum([p[name][k] for p in parts], axis=0).tolist()
        for k in ('correct', 'valid', 'images'):
            assert c[k] == sum(p[name][k] for p in parts)
    assert total['clean']['images'] == 9
    # the parts are not changed
    assert parts[0]['fog/2']['intersect'] != total['fog/2']['intersect']
    assert sum_counts(parts[::-1]) == total
    summary = summarize_corruptions(total, names, [2])
    np.testing.assert_allclose(
        _as_array(summary['clean']), _oracle_scores(total['clean']), rtol=1e-12
    )


def test_metric_without_the_loop_says_what_to_set():
    from mmseg_robust.evaluation import CorruptionMetric

    with pytest.raises(
        ValueError, match="test_cfg=dict\\(type='CorruptionTestLoop'\\)"
    ):
        CorruptionMetric().process(None, [dict(pred_sem_seg=None)])
