"""Every config under configs/ builds its model (datasets absent, no pretrained
files) and runs forward + backward on a small input; the PIR-AT / clean / SEA
configs follow the papers' protocol (docs/algorithms.md sections 4 and 5.1); the data
protocol's datasets and transforms (mmseg_robust/datasets/)."""

import copy
import glob
import os.path as osp
import re

import numpy as np
import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmengine.registry import init_default_scope
from PIL import Image, ImageFilter

import mmseg_robust  # noqa: F401
import mmseg_robust.datasets  # noqa: F401  (until imported by
import mmseg_robust.models.backbones  # noqa: F401  the package __init__ files)
from mmseg_robust.registry import DATASETS, MODELS, TRANSFORMS


def _import_all_model_modules():
    # Register every component present, also those the package __init__ files
    # do not import yet (work in progress of other parts).
    import importlib
    import pkgutil

    import mmseg_robust.models as models

    for info in pkgutil.walk_packages(models.__path__, models.__name__ + '.'):
        importlib.import_module(info.name)


_import_all_model_modules()
REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
ALL_CONFIGS = sorted(
    p
    for p in glob.glob(osp.join(REPO, 'configs', '**', '*.py'), recursive=True)
    if '_base_' not in p
)
PIRAT_DIR = osp.join(REPO, 'configs', 'pirat')
# Short names of full configs (the project's design card names them), checked
# by test_short_config_names_are_their_full_configs.
SHORT_NAMES = {
    'upernet_convnext_t_ade20k.py': (
        'upernet_convnext-t-cvst_pirat_8xb16-128e_ade20k151-512x512.py'
    ),
}
PIRAT_CONFIGS = sorted(
    p
    for p in glob.glob(osp.join(PIRAT_DIR, '*.py'))
    if osp.basename(p) not in SHORT_NAMES
)
SIZE = 64
# A PIR-AT config's comment with the published SEA mIoU of its model.
PUBLISHED_RE = re.compile(
    r'# Published SEA mIoU \(Croce, Singh & Hein, ECCV 2024\), clean / eps 4/255 / '
    r'eps 8/255:\n#\s+([\d.]+) / ([\d.]+) / ([\d.]+)'
)


def _published_sea_miou():
    """docs/algorithms.md section 4's table: (model, dataset) -> (clean, SEA
    mIoU at 4/255, at 8/255)."""
    with open(osp.join(REPO, 'docs', 'algorithms.md'), encoding='utf-8') as f:
        text = f.read()
    table = text.split('**Published numbers.**', 1)[1].split('\n\n')[1]
    rows = {}
    for row in table.splitlines()[2:]:
        model, dataset, *numbers = (c.strip() for c in row.strip('|').split('|'))
        rows[(model, dataset)] = tuple(float(n) for n in numbers)
    assert len(rows) == 5, rows
    return rows


pytestmark = pytest.mark.usefixtures('one_thread')


def rel(path):
    return osp.relpath(path, REPO)


def _strip_pretrained(cfg):
    """Recursively drop pretrained weights (init_cfg / pretrained)."""
    if isinstance(cfg, dict):
        out = {}
        for k, v in cfg.items():
            if k == 'pretrained':
                out[k] = None
            elif k == 'init_cfg' and isinstance(v, dict) and 'checkpoint' in v:
                out[k] = None
            else:
                out[k] = _strip_pretrained(v)
        return out
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(_strip_pretrained(v) for v in cfg)
    return cfg


def small_model_cfg(path):
    model = _strip_pretrained(Config.fromfile(path).model.to_dict())
    pre = model.get('data_preprocessor')
    if isinstance(pre, dict) and pre.get('size') is not None:
        pre['size'] = (SIZE, SIZE)
    return model


# Configs that share a model (PIR-AT / clean / SEA of one architecture) build it
# once: group them by their model config.
_GROUPS = {}
for _p in ALL_CONFIGS:
    _GROUPS.setdefault(repr(small_model_cfg(_p)), []).append(_p)
MODEL_GROUPS = sorted(_GROUPS.values())


def _batch(model, num_classes, seed=0):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(seed)
    samples, inputs = [], []
    for _ in range(2):
        img = torch.randint(0, 256, (3, SIZE, SIZE), generator=g, dtype=torch.uint8)
        label = torch.randint(0, num_classes, (1, SIZE, SIZE), generator=g)
        # gt_division: DDC-AT heads need it (zeros: nothing routed).
        sample = SegDataSample(
            gt_sem_seg=PixelData(data=label),
            gt_division=PixelData(data=torch.zeros_like(label)),
        )
        sample.set_metainfo(dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE)))
        inputs.append(img)
        samples.append(sample)
    return model.data_preprocessor(
        dict(inputs=inputs, data_samples=samples), training=True
    )


@pytest.mark.parametrize('group', MODEL_GROUPS, ids=[rel(g[0]) for g in MODEL_GROUPS])
def test_config_builds_model_and_trains_one_step(group):
    init_default_scope('mmseg')
    for path in group:  # every config of the group parses
        Config.fromfile(path)
    torch.manual_seed(0)
    model = MODELS.build(ConfigDict(small_model_cfg(group[0])))
    model.train()
    data = _batch(model, model.decode_head.num_classes)
    losses = model.loss(data['inputs'], data['data_samples'])
    total = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    if osp.dirname(group[0]) == PIRAT_DIR:
        # Raw [0, 1] RGB input: the preprocessor only divides by 255.
        assert 0.0 <= data['inputs'].min() and data['inputs'].max() <= 1.0
        model.eval()
        with torch.no_grad():
            out = model.predict(data['inputs'], data['data_samples'])
        assert out[0].seg_logits.data.shape == (
            model.decode_head.num_classes,
            SIZE,
            SIZE,
        )


# ----------------------------------------------------------------------------
# The config files: every shipped config loads, every base is used
# ----------------------------------------------------------------------------
BASE_DIR = osp.join(REPO, 'configs', '_base_')


def _base_files(path):
    """The files ``path`` inherits from directly (its ``_base_``, read without
    executing the config); ``mmseg::`` bases are left out."""
    import ast

    for node in ast.parse(open(path).read()).body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and getattr(node.targets[0], 'id', None) == '_base_'
        ):
            bases = ast.literal_eval(node.value)
            bases = [bases] if isinstance(bases, str) else bases
            return [
                osp.normpath(osp.join(osp.dirname(path), b))
                for b in bases
                if '::' not in b
            ]
    return []


@pytest.mark.parametrize('path', ALL_CONFIGS, ids=rel)
def test_shipped_config_loads(path):
    cfg = Config.fromfile(path)
    assert 'model' in cfg and 'train_dataloader' in cfg


def test_every_base_file_is_used_by_a_shipped_config():
    """Every file under configs/_base_ is inherited by a shipped config, or is an
    evaluator preset that `--cfg-options evaluator=NAME` loads."""
    from mmseg_robust.engine.presets import EVALUATOR_PRESETS, config_dir

    preset_dir = osp.join(config_dir(), '_base_', 'evaluators')
    presets = {osp.join(preset_dir, f) for f in EVALUATOR_PRESETS.values()}
    assert all(osp.isfile(p) for p in presets), presets
    used, todo = set(presets), list(ALL_CONFIGS)
    while todo:
        for base in _base_files(todo.pop()):
            assert osp.isfile(base), base
            if base not in used:
                used.add(base)
                todo.append(base)
    bases = set(glob.glob(osp.join(BASE_DIR, '**', '*.py'), recursive=True))
    assert bases, BASE_DIR
    assert sorted(map(rel, bases - used)) == []


# ----------------------------------------------------------------------------
# The PIR-AT configs
# ----------------------------------------------------------------------------
def _cfg(name):
    return Config.fromfile(osp.join(PIRAT_DIR, name))


def test_the_pirat_config_set_is_complete():
    names = {osp.basename(p)[:-3] for p in PIRAT_CONFIGS}
    train = {n for n in names if not n.endswith('_sea')}
    # the leaking variants (the published trainer's objective) train only: the
    # _sea config of their recipe evaluates them
    leak = {n for n in train if '_pirat-leak_' in n}
    assert {n + '_sea' for n in train - leak} == names - train
    # UperNet T/S x VOC/ADE20K x PIR-AT/clean + Segmenter (reference, AdamW variant)
    assert len(train - leak) == 10
    # every PIR-AT recipe of the reference has its leaking variant
    recipes = {n for n in train - leak if '_pirat_' in n}
    assert {n.replace('_pirat_', '_pirat-leak_') for n in recipes} == leak
    assert len(leak) == 5


@pytest.mark.parametrize(
    'path', [p for p in PIRAT_CONFIGS if '_pirat-leak_' in p], ids=rel
)
def test_leak_variant_is_its_recipe_with_the_leak(path):
    name = osp.basename(path)
    recipe = Config.fromfile(osp.join(PIRAT_DIR, name.replace('-leak', ''))).to_dict()
    cfg = Config.fromfile(path).to_dict()
    assert cfg['train_cfg'].pop('leak_attack_grads') is True
    assert recipe['train_cfg'].get('leak_attack_grads', False) is False
    recipe['train_cfg'].pop('leak_attack_grads', None)
    assert cfg == recipe
    text = open(path).read()
    assert 'These numbers come from this objective' in text


@pytest.mark.parametrize('short, full', sorted(SHORT_NAMES.items()))
def test_short_config_names_are_their_full_configs(short, full):
    a = Config.fromfile(osp.join(PIRAT_DIR, short)).to_dict()
    b = Config.fromfile(osp.join(PIRAT_DIR, full)).to_dict()
    assert a == b
    assert a['train_cfg']['type'] == 'AdversarialTrainLoop'


@pytest.mark.parametrize('path', PIRAT_CONFIGS, ids=rel)
def test_pirat_config_protocol(path):
    cfg = Config.fromfile(path)
    name = osp.basename(path)
    text = open(path).read()
    voc = 'voc12aug' in name
    # The Segmenter's reference schedule (Segmenter's own SGD one, checked in
    # tests/test_segmenter_pirat_schedule.py); its AdamW variant is ours.
    segmenter_sgd = name.startswith('segmenter') and '-adamw' not in name
    num_classes, crop = (21, 473) if voc else (151, 512)
    model = cfg.model
    pre = model.data_preprocessor
    assert (pre.mean, pre.std, pre.bgr_to_rgb) == ([0.0] * 3, [255.0] * 3, True)
    assert tuple(pre.size) == (crop, crop)
    assert model.decode_head.num_classes == num_classes
    # Published numbers: a PIR-AT config states docs/algorithms.md section 4's SEA
    # mIoU of its model; the clean baselines and our AdamW variant state none.
    stated = PUBLISHED_RE.search(text)
    if '_pirat_' in name or '_pirat-leak_' in name:
        if name.startswith('upernet'):
            size = 'T' if 'convnext-t' in name else 'S'
            key = f'UperNet-ConvNeXt-{size}-CvSt'
        else:
            key = 'Segmenter ViT-S'
        published = _published_sea_miou()[(key, 'PASCAL-VOC' if voc else 'ADE20K')]
        assert stated is not None, name
        assert tuple(float(v) for v in stated.groups()) == published
        # and says that they come from the leaking objective
        after = text[stated.end() :].split('\n_base_', 1)[0]
        assert 'These numbers come from' in after, name
        assert 'leak' in after or '_pirat-leak_' in name, name
    else:
        assert stated is None and '# Published numbers: none' in text
    if name.startswith('upernet'):
        size = 't' if 'convnext-t' in name else 's'
        backbone = model.backbone
        assert backbone.type == 'ConvNeXtCvSt'
        assert backbone.arch == {'t': 'tiny', 's': 'small'}[size]
        assert backbone.drop_path_rate == {'t': 0.4, 's': 0.3}[size]
        head, aux = model.decode_head, model.auxiliary_head
        assert (head.type, head.channels, tuple(head.pool_scales)) == (
            'UPerHead',
            512,
            (1, 2, 3, 6),
        )
        assert (
            aux.type,
            aux.in_channels,
            aux.in_index,
            aux.channels,
            aux.loss_decode.loss_weight,
        ) == ('FCNHead', 384, 2, 256, 0.4)
        assert aux.num_classes == num_classes
    else:
        backbone = model.backbone
        assert (
            backbone.embed_dims,
            backbone.num_layers,
            backbone.num_heads,
            backbone.patch_size,
        ) == (384, 12, 6, 16)
        assert model.decode_head.num_layers == 2
    # Data: the protocol datasets and evaluation crops.
    dataset = cfg.test_dataloader.dataset
    assert dataset.type == (
        'PascalVOCVoidAsBackgroundDataset' if voc else 'ADE20K151Dataset'
    )
    assert (
        dict(type='ShortEdgeResizeCenterCrop', crop_size=crop, backend='pillow')
        in dataset.pipeline
    )
    train_ds = cfg.train_dataloader.dataset
    pipeline = (train_ds.datasets[0] if voc else train_ds).pipeline
    types = [t['type'] for t in pipeline]
    assert types == [
        'LoadImageFromFile',
        'LoadAnnotations',
        'RandomResize',
        'RandomCrop',
        'RandomFlip',
        'RandomGaussianBlur',
        'PackSegInputs',
    ]
    assert tuple(pipeline[2]['ratio_range']) == (0.5, 2.0)
    assert cfg.train_dataloader.batch_size == (
        32 if voc else 14 if segmenter_sgd else 16
    )
    if name.endswith('_sea.py'):
        # the SEA preset (configs/_base_/evaluators/sea.py) with the
        # dataset's class weights
        assert cfg.test_cfg == dict(
            type='AdversarialTestLoop',
            eps=[4, 8],
            seed=0,
            resume=True,
            log_interval=1,
            attacks=[
                dict(type='SEA', steps=300, class_weights='voc' if voc else 'ade20k')
            ],
        )
        assert cfg.test_evaluator == dict(
            type='RobustnessMetric',
            name='SEA',
            seed=0,
            worst_case_modes=['best', 'reference'],
        )
        assert model.backbone.get('init_cfg') is None
        return
    init = model.backbone.init_cfg
    assert init.type == 'Pretrained' and init.checkpoint.startswith(
        'checkpoints/revisiting_at/'
    )
    if '_pirat' in name:
        assert 'linf4' in init.checkpoint
        assert cfg.train_cfg.type == 'AdversarialTrainLoop'
        assert cfg.train_cfg.scheme == 'pirat'
        assert cfg.train_cfg.attack == dict(
            type='PGD', eps=4, steps=5, step_size=2.55, random_start=False
        )
        assert cfg.train_cfg.get('leak_attack_grads', False) is ('-leak_' in name)
        assert cfg.optim_wrapper.type == 'OptimWrapper'
    else:
        assert 'clean' in init.checkpoint
        assert cfg.train_cfg.type == 'IterBasedTrainLoop'
        assert cfg.optim_wrapper.type == 'OptimWrapper'
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == (
        ('AdamW', 1e-3, 0.01)
        if voc
        else ('SGD', 1e-3, 1e-5)
        if segmenter_sgd
        else ('AdamW', 1e-4, 0.05)
    )


@pytest.mark.parametrize(
    'name, iters, warmup',
    [
        (
            'upernet_convnext-t-cvst_pirat_8xb32-50e_voc12aug-473x473.py',
            50 * 41,
            10 * 41,
        ),
        (
            'upernet_convnext-s-cvst_clean_8xb16-128e_ade20k151-512x512.py',
            128 * 157,
            5 * 157,
        ),
    ],
)
def test_schedule_warmup_then_linear_decay(name, iters, warmup):
    from mmengine.optim.scheduler import LinearLR, PolyLR

    cfg = _cfg(name)
    assert cfg.train_cfg.max_iters == iters
    lr = cfg.optim_wrapper.optimizer.lr
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    warm, poly = (copy.deepcopy(s) for s in cfg.param_scheduler)
    assert warm.pop('type') == 'LinearLR' and poly.pop('type') == 'PolyLR'
    schedulers = [LinearLR(opt, **warm), PolyLR(opt, **poly)]
    lrs = []
    for _ in range(iters):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        for s in schedulers:
            s.step()
    # The reference's WarmupPolyLR (linear warm-up from 1e-5 x lr, then linear
    # decay to 0); mmengine's schedulers are off by one step at each end.
    assert lrs[0] == pytest.approx(1e-5 * lr)
    assert int(np.argmax(lrs)) in (warmup - 1, warmup)
    assert max(lrs) == pytest.approx(lr)
    assert lrs[warmup // 2] == pytest.approx(lr / 2, rel=5e-3)
    mid = (warmup + iters) // 2
    assert lrs[mid] == pytest.approx(lr * (iters - mid) / (iters - warmup), rel=2e-3)
    assert lrs[-1] <= lr / (iters - warmup)
    diffs = np.diff(lrs)
    assert (diffs[: warmup - 1] > 0).all() and (diffs[warmup:] < 0).all()


def test_no_weight_decay_on_norms_and_1d_parameters():
    from mmengine.optim import build_optim_wrapper

    init_default_scope('mmseg')
    name = 'upernet_convnext-t-cvst_clean_8xb32-50e_voc12aug-473x473.py'
    cfg = _cfg(name)
    model = MODELS.build(ConfigDict(small_model_cfg(osp.join(PIRAT_DIR, name))))
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {
        id(p): g['weight_decay']
        for g in wrapper.optimizer.param_groups
        for p in g['params']
    }
    for pname, p in model.named_parameters():
        expected = 0.0 if p.ndim <= 1 else 0.01
        assert decay[id(p)] == expected, pname


# ----------------------------------------------------------------------------
# Data protocol: datasets and transforms
# ----------------------------------------------------------------------------
def _write_sample(root, img_dir, ann_dir, name, w, h, labels, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    osp.isdir(osp.join(root, img_dir)) or __import__('os').makedirs(
        osp.join(root, img_dir)
    )
    osp.isdir(osp.join(root, ann_dir)) or __import__('os').makedirs(
        osp.join(root, ann_dir)
    )
    Image.fromarray(img).save(osp.join(root, img_dir, name + '.jpg'), quality=100)
    seg = rng.choice(np.asarray(labels, dtype=np.uint8), size=(h, w))
    Image.fromarray(seg).save(osp.join(root, ann_dir, name + '.png'))
    return seg


def _reference_eval_crop(array, s, resample):
    """The reference's val transform (PIL), for an H x W (x C) uint8 array."""
    h, w = array.shape[:2]
    if w > h:
        ow, oh = int(1.0 * w * s / h), s
    else:
        ow, oh = s, int(1.0 * h * s / w)
    out = np.asarray(Image.fromarray(array).resize((ow, oh), resample))
    x1, y1 = int(round((ow - s) / 2.0)), int(round((oh - s) / 2.0))
    return out[y1 : y1 + s, x1 : x1 + s]


def test_voc_protocol_void_to_background_and_centre_crop(tmp_path):
    init_default_scope('mmseg')
    cfg = _cfg('upernet_convnext-t-cvst_pirat_8xb32-50e_voc12aug-473x473_sea.py')
    root = str(tmp_path / 'VOC2012')
    seg = _write_sample(
        root, 'JPEGImages', 'SegmentationClass', 'a', 500, 375, [0, 3, 15, 255]
    )
    (tmp_path / 'VOC2012' / 'ImageSets' / 'Segmentation').mkdir(parents=True)
    for split in ('val', 'train'):
        (
            tmp_path / 'VOC2012' / 'ImageSets' / 'Segmentation' / f'{split}.txt'
        ).write_text('a\n')
    ds_cfg = dict(cfg.test_dataloader.dataset, data_root=root)
    ds = DATASETS.build(ds_cfg)
    assert len(ds.metainfo['classes']) == 21
    out = ds[0]
    gt = out['data_samples'].gt_sem_seg.data[0].numpy()
    assert gt.shape == (473, 473)
    assert out['data_samples'].ori_shape == (473, 473)
    expected = _reference_eval_crop(seg, 473, Image.NEAREST).copy()
    expected[expected == 255] = 0
    np.testing.assert_array_equal(gt, expected)
    assert 255 not in gt
    bgr = np.asarray(Image.open(osp.join(root, 'JPEGImages', 'a.jpg')))[..., ::-1]
    img = out['inputs'].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(
        img, _reference_eval_crop(np.ascontiguousarray(bgr), 473, Image.BILINEAR)
    )
    # The training pipeline runs and keeps the mapping.
    np.random.seed(0)
    train_cfg = dict(cfg.train_dataloader.dataset.datasets[0], data_root=root)
    sample = DATASETS.build(train_cfg)[0]
    gt = sample['data_samples'].gt_sem_seg.data
    assert max(gt.shape[-2:]) <= 473 and set(gt.unique().tolist()) <= {0, 3, 15}


def test_ade20k_protocol_keeps_label_zero(tmp_path):
    init_default_scope('mmseg')
    cfg = _cfg('upernet_convnext-t-cvst_pirat_8xb16-128e_ade20k151-512x512.py')
    root = str(tmp_path / 'ADEChallengeData2016')
    seg = _write_sample(
        root, 'images/validation', 'annotations/validation', 'b', 400, 600, [0, 1, 150]
    )
    ds = DATASETS.build(dict(cfg.val_dataloader.dataset, data_root=root))
    assert len(ds.metainfo['classes']) == 151
    assert ds.metainfo['classes'][0] == 'other'
    gt = ds[0]['data_samples'].gt_sem_seg.data[0].numpy()
    np.testing.assert_array_equal(gt, _reference_eval_crop(seg, 512, Image.NEAREST))
    assert {0, 1, 150} == set(np.unique(gt).tolist())
    with pytest.raises(ValueError, match='reduce_zero_label'):
        DATASETS.build(
            dict(cfg.val_dataloader.dataset, data_root=root, reduce_zero_label=True)
        )


def test_random_gaussian_blur_matches_pil():
    blur = TRANSFORMS.build(dict(type='RandomGaussianBlur', prob=1.0, max_radius=1.0))
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.random.seed(3)
    out = blur(dict(img=img.copy()))['img']
    np.random.seed(3)
    np.random.rand()  # the probability draw
    radius = float(np.random.rand())
    expected = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))
    np.testing.assert_array_equal(out, expected)
    never = TRANSFORMS.build(dict(type='RandomGaussianBlur', prob=0.0))
    np.testing.assert_array_equal(never(dict(img=img.copy()))['img'], img)
