"""tools/dataset_converters/make_corrupted.py: the corrupted test sets written in
the dataset's own layout are what ``evaluator=Corruptions`` feeds the pipeline.

- the layout: ``OUT/<corruption>/<severity>/`` mirrors ``data_root`` (nested
  Cityscapes folders, ADE20K's JPEG images as PNG, VOC's split file), with the
  annotations hard-linked;
- each written image equals the output of the evaluator's ``Corrupt`` in its
  pass pipeline, and a plain config's test pipeline on the written tree gives
  the evaluator's corrupted-pass inputs;
- the acceptance: ``tools/test.py`` with a plain (shrunk) config on the written
  tree gives, image for image, the pooled counts and the mIoU/aAcc/mAcc of the
  evaluator's corrupted pass on the original tree;
- the errors: dataset wrappers, images outside data_root, an output folder
  inside data_root.
"""

import glob
import importlib.util
import json
import os
import os.path as osp

import mmcv
import numpy as np
import pytest
import torch

pytest.importorskip('imagecorruptions')

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'dataset_converters', 'make_corrupted.py')
ADE_CONFIG = osp.join(REPO, 'configs', 'pirat', 'upernet_convnext_t_ade20k.py')
CITY_CONFIG = osp.join(
    REPO, 'configs', 'sat', 'pspnet_r50-d8_sat_cityscapes-449x449.py'
)
VOC_CONFIG = osp.join(REPO, 'configs', 'sat', 'pspnet_r50-d8_sat_voc12aug-473x473.py')
# Cheap corruptions (no numba compile), one noise and one weather.
UNITS = [('gaussian_noise', 3), ('fog', 3)]


@pytest.fixture(scope='module')
def tool():
    spec = importlib.util.spec_from_file_location('_make_corrupted_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _root_opt(root, split='test'):
    return [f'{split}_dataloader.dataset.data_root={root}']


def _make(tool, config, root, out, units=UNITS, extra=()):
    corruptions = ','.join(sorted({c for c, _ in units}))
    severities = ','.join(str(s) for s in sorted({s for _, s in units}))
    argv = [config, '--out', str(out), '--corruptions', corruptions]
    argv += ['--severities', severities, *extra, '--cfg-options', *_root_opt(root)]
    return tool.make_corrupted(tool.parse_args(argv))


def _dataset(config, options):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    cfg = Config.fromfile(config)
    cfg.merge_from_dict(options)
    init_default_scope('mmseg')
    return DATASETS.build(cfg.test_dataloader.dataset)


def _after_corrupt(pipeline, info):
    """The image right after the Corrupt transform of an evaluator pass."""
    from mmseg_robust.datasets import Corrupt

    results = info
    for t in pipeline.transforms:
        results = t(results)
        if isinstance(t, Corrupt):
            return results['img']
    raise AssertionError('no Corrupt in the pass pipeline')


def _check_written(config, root, out, manifest, new_suffix):
    """Every written image is the evaluator's corrupted image; the plain test
    pipeline on the written tree gives the evaluator's pass inputs."""
    from mmseg_robust.engine.corruption_loop import _pass_pipeline

    original = _dataset(config, {'test_dataloader.dataset.data_root': root})
    clean = _pass_pipeline(original, ('clean', 0), 0)
    assert manifest['img_suffix'] == new_suffix
    for c, s in UNITS:
        unit_root = osp.join(out, c, str(s))
        written = _dataset(
            config,
            {
                'test_dataloader.dataset.data_root': unit_root,
                'test_dataloader.dataset.img_suffix': new_suffix,
            },
        )
        assert len(written) == len(original) == manifest['num_images']
        evaluator_pass = _pass_pipeline(original, (c, s), 0)
        plain = written.pipeline
        for i in range(len(original)):
            info = original.get_data_info(i)
            new = written.get_data_info(i)
            rel = osp.relpath(info['img_path'], root)
            assert osp.relpath(new['img_path'], unit_root) == (
                rel[: -len(original.img_suffix)] + new_suffix
            )
            corrupted = _after_corrupt(evaluator_pass, original.get_data_info(i))
            assert np.array_equal(mmcv.imread(new['img_path']), corrupted)
            # the corruption changed the image
            assert not np.array_equal(corrupted, mmcv.imread(info['img_path']))
            # annotations: the same file, hard-linked
            assert osp.samefile(new['seg_map_path'], info['seg_map_path'])
            a = plain(written.get_data_info(i))
            b = evaluator_pass(original.get_data_info(i))
            assert torch.equal(a['inputs'], b['inputs'])
            assert torch.equal(
                a['data_samples'].gt_sem_seg.data, b['data_samples'].gt_sem_seg.data
            )
            assert not torch.equal(
                a['inputs'], clean(original.get_data_info(i))['inputs']
            )


def _files(folder):
    return sorted(
        osp.relpath(p, folder)
        for p in glob.glob(osp.join(folder, '**', '*'), recursive=True)
        if osp.isfile(p)
    )


def test_cityscapes_nested_layout_and_images(tool, mini_cityscapes, tmp_path, capsys):
    out = tmp_path / 'cityscapes-c'
    manifest = _make(tool, CITY_CONFIG, mini_cityscapes, out, extra=['--workers', '2'])
    printed = capsys.readouterr().out
    stems = sorted(
        osp.relpath(p, osp.join(mini_cityscapes, 'leftImg8bit'))[
            : -len('_leftImg8bit.png')
        ]
        for p in glob.glob(
            osp.join(mini_cityscapes, 'leftImg8bit', 'val', '*', '*.png')
        )
    )
    assert len(stems) == 3 and all(s.count('/') == 2 for s in stems)
    expected = sorted(
        [f'leftImg8bit/{s}_leftImg8bit.png' for s in stems]
        + [f'gtFine/{s}_gtFine_labelTrainIds.png' for s in stems]
    )
    for c, s in UNITS:
        assert _files(out / c / str(s)) == expected
    assert sorted(os.listdir(out)) == ['fog', 'gaussian_noise', 'make_corrupted.json']
    assert manifest == json.loads((out / 'make_corrupted.json').read_text())
    assert (manifest['seed'], manifest['severities']) == (0, [3])
    # PNG images keep their names: data_root is the only option to set
    assert f'test_dataloader.dataset.data_root={out}/gaussian_noise/3' in printed
    assert 'img_suffix' not in printed
    _check_written(CITY_CONFIG, mini_cityscapes, out, manifest, '_leftImg8bit.png')


def test_ade20k_jpeg_images_are_written_as_png(tool, mini_ade20k, tmp_path, capsys):
    out = tmp_path / 'ade20k-c'
    manifest = _make(tool, ADE_CONFIG, mini_ade20k, out)
    printed = capsys.readouterr().out
    names = sorted(
        osp.basename(p)[:-4]
        for p in glob.glob(osp.join(mini_ade20k, 'images', 'validation', '*.jpg'))
    )
    assert len(names) == 3
    expected = sorted(
        [f'images/validation/{n}.png' for n in names]
        + [f'annotations/validation/{n}.png' for n in names]
    )
    for c, s in UNITS:
        assert _files(out / c / str(s)) == expected
    options = (
        f'test_dataloader.dataset.data_root={out}/gaussian_noise/3 '
        'test_dataloader.dataset.img_suffix=.png'
    )
    assert options in printed
    _check_written(ADE_CONFIG, mini_ade20k, out, manifest, '.png')


def test_voc_split_file_is_linked(tool, mini_voc, tmp_path):
    out = tmp_path / 'voc-c'
    manifest = _make(tool, VOC_CONFIG, mini_voc, out, units=[('gaussian_noise', 1)])
    unit_root = out / 'gaussian_noise' / '1'
    split = osp.join('ImageSets', 'Segmentation', 'val.txt')
    assert osp.samefile(unit_root / split, osp.join(mini_voc, split))
    ids = open(osp.join(mini_voc, split)).read().split()
    assert manifest['num_images'] == len(ids) == 4
    assert _files(unit_root) == sorted(
        [split]
        + [f'JPEGImages/{i}.png' for i in ids]
        + [f'SegmentationClass/{i}.png' for i in ids]
    )
    written = _dataset(
        VOC_CONFIG,
        {
            'test_dataloader.dataset.data_root': str(unit_root),
            'test_dataloader.dataset.img_suffix': '.png',
        },
    )
    assert [osp.basename(written.get_data_info(i)['img_path']) for i in range(4)] == [
        f'{i}.png' for i in ids
    ]


def test_jpg_format_keeps_the_names_and_says_the_numbers_change(
    tool, mini_ade20k, tmp_path, capsys
):
    out = tmp_path / 'ade20k-c-jpg'
    manifest = _make(
        tool, ADE_CONFIG, mini_ade20k, out, [('fog', 1)], ['--format', 'jpg']
    )
    printed = capsys.readouterr().out
    assert manifest['img_suffix'] == '.jpg'
    assert all(
        p.endswith('.jpg') for p in _files(out / 'fog' / '1') if p.startswith('images')
    )
    assert 'img_suffix' not in printed
    assert 'JPEG compression changes the corrupted images' in printed


def test_bad_input_is_refused(tool, mini_ade20k, tmp_path):
    concat = tmp_path / 'concat.py'
    part = (
        f'dict(type="ADE20KDataset", data_root={mini_ade20k!r}, '
        'data_prefix=dict(img_path="images/validation", '
        'seg_map_path="annotations/validation"), reduce_zero_label=True, '
        'pipeline=[dict(type="LoadImageFromFile")])'
    )
    concat.write_text(
        f'_base_ = {ADE_CONFIG!r}\n'
        'test_dataloader = dict(dataset=dict(_delete_=True, type="ConcatDataset", '
        f'datasets=[{part}, {part}]))\n'
    )
    args = tool.parse_args([str(concat), '--out', str(tmp_path / 'o1')])
    with pytest.raises(ValueError, match='dataset wrappers'):
        tool.make_corrupted(args)
    outside = [
        '--cfg-options',
        f'test_dataloader.dataset.data_root={mini_ade20k}/annotations',
        'test_dataloader.dataset.data_prefix.img_path=../images/validation',
        'test_dataloader.dataset.data_prefix.seg_map_path=validation',
    ]
    args = tool.parse_args([ADE_CONFIG, '--out', str(tmp_path / 'o2'), *outside])
    with pytest.raises(ValueError, match='lies outside data_root'):
        tool.make_corrupted(args)
    with pytest.raises(ValueError, match='overlap'):
        _make(tool, ADE_CONFIG, mini_ade20k, osp.join(mini_ade20k, 'corrupted'))
    with pytest.raises(SystemExit, match='unknown corruption'):
        tool.main([ADE_CONFIG, '--out', str(tmp_path / 'o3'), '--corruptions', 'rain'])


def _calibrated_checkpoint(cfg_path, root, path):
    """The shrunk model, seeded, with the bias of the most frequent label class
    raised to the median margin of the other classes' logits on the clean
    images: about half of the pixels predict that class, the rest follow the
    image, so the pooled counts (and mIoU, aAcc, mAcc) depend on the
    corruption and are not all zero."""
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS, MODELS

    cfg = Config.fromfile(cfg_path)
    cfg.test_dataloader.dataset.data_root = root
    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    with torch.no_grad():
        samples = [
            model.test_step(pseudo_collate([dataset[i]]))[0]
            for i in range(len(dataset))
        ]
    labels = torch.cat([s.gt_sem_seg.data.flatten() for s in samples])
    labels = labels[labels != 255]
    k = int(torch.bincount(labels).argmax())
    margins = []
    for s in samples:
        logits = s.seg_logits.data
        others = torch.cat([logits[:k], logits[k + 1 :]]).amax(0)
        margins.append((others - logits[k]).flatten())
    head = model.decode_head.conv_seg
    with torch.no_grad():
        head.bias[k] += torch.cat(margins).median()
    torch.save(dict(state_dict=model.state_dict(), meta={}), path)
    return path


def _counts(work_dir):
    (path,) = glob.glob(osp.join(str(work_dir), 'robustness_*.json'))
    with open(path) as f:
        summary = json.load(f)['summary']
    return summary['corruptions']


def _test_options(root, suffix=None):
    opts = [
        f'test_dataloader.dataset.data_root={root}',
        'test_dataloader.num_workers=0',
        'test_dataloader.persistent_workers=False',
    ]
    return opts + ([f'test_dataloader.dataset.img_suffix={suffix}'] if suffix else [])


@pytest.fixture(scope='module')
def ade_corrupted(
    tool, mini_ade20k, real_data_matrix, tools_in_one_process, tmp_path_factory
):
    """A shrunk ADE20K config and checkpoint, its corrupted set written by the
    tool, and ``evaluator=Corruptions`` on the original tree (UNITS)."""
    from mmengine.config import Config

    tmp = tmp_path_factory.mktemp('ade_corrupted')
    cfg = real_data_matrix.write_child(
        tmp,
        ADE_CONFIG,
        'ade.py',
        real_data_matrix._model_shrink(Config.fromfile(ADE_CONFIG)),
    )
    ckpt = _calibrated_checkpoint(cfg, mini_ade20k, str(tmp / 'ade.pth'))
    out = tmp / 'ade20k-c'
    _make(tool, cfg, mini_ade20k, out)
    corruptions = ','.join(c for c, _ in UNITS)
    severities = sorted({s for _, s in UNITS})
    real_data_matrix._run_tools(
        tools_in_one_process,
        [
            osp.join(REPO, 'tools', 'test.py'),
            cfg,
            ckpt,
            '--work-dir',
            tmp / 'evaluator',
            '--cfg-options',
            *_test_options(mini_ade20k),
            'evaluator=Corruptions',
            f'evaluator.corruptions={corruptions}',
            f'evaluator.severities={severities}',
        ],
    )
    yield dict(cfg=cfg, ckpt=ckpt, out=out, tmp=tmp, corr=_counts(tmp / 'evaluator'))
    tools_in_one_process.reset_singletons()


@pytest.mark.parametrize('unit', UNITS, ids=lambda u: f'{u[0]}-{u[1]}')
def test_plain_config_on_the_written_set_gives_the_evaluator_numbers(
    ade_corrupted, unit, real_data_matrix, tools_in_one_process
):
    """The acceptance: tools/test.py with the plain config on the written tree
    scores what evaluator=Corruptions scores on the original tree."""
    c, s = unit
    run = ade_corrupted
    tmp, unit_root = run['tmp'], run['out'] / c / str(s)
    plain, clean_pass = tmp / f'plain-{c}-{s}', tmp / f'clean-pass-{c}-{s}'
    test = osp.join(REPO, 'tools', 'test.py')
    real_data_matrix._run_tools(
        tools_in_one_process,
        # the plain config (IoUMetric) on the written tree
        [test, run['cfg'], run['ckpt'], '--work-dir', plain, '--cfg-options']
        + _test_options(unit_root, '.png'),
        # the same, through the evaluator's clean pass: its exact pooled counts
        # (the evaluator needs a corruption: brightness/1, not compared)
        [test, run['cfg'], run['ckpt'], '--work-dir', clean_pass, '--cfg-options']
        + _test_options(unit_root, '.png')
        + ['evaluator=Corruptions', 'evaluator.corruptions=brightness']
        + ['evaluator.severities=[1]'],
    )
    corr = run['corr']
    expected = corr['counts'][f'{c}/{s}']
    assert _counts(clean_pass)['counts']['clean'] == expected
    # the corruption changed the predictions (so the equality above is not
    # that of two clean passes)
    assert expected['union'] != corr['counts']['clean']['union']
    assert expected['correct'] != corr['counts']['clean']['correct']
    assert expected['correct'] > 0
    (log,) = glob.glob(osp.join(str(plain), '*', '*.json'))
    with open(log) as f:
        metrics = json.load(f)
    scores = corr['per_corruption'][c]['severity'][str(s)]
    for m in ('mIoU', 'aAcc', 'mAcc'):
        # IoUMetric rounds to 2 decimals (and sums in float32)
        assert abs(metrics[m] - scores[m]) <= 0.0051, (m, metrics[m], scores[m])
