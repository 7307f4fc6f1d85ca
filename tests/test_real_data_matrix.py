"""Every shipped training config, and adversarial training of mmseg's own model zoo,
end to end through the stock tools on miniature copies of the real datasets.

Each case trains (one iteration) with the config's real pipeline (resize, crop,
flip, blur, rotation, photometric distortion: whatever it has), data
preprocessor, loop and optimizer through ``tools/train.py``, then evaluates the
checkpoint with SEA (its ``_sea`` config, or ``--cfg-options evaluator=SEA``)
through ``tools/test.py``. Only the model's width/depth, the batch size, the
iteration counts and the attack's iterations are shrunk, by a test-only child
config (the shipped file is its ``_base_``); the data roots point at the
miniature trees of ``tests/mini_datasets.py``.
"""

import glob
import json
import os.path as osp
import re

import pytest
from mmengine.config import Config

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
ITERS = 1
SEA_ITERS = 4  # SEA's three APGD stages of 1, 1 and 2 iterations

# Width/depth reductions by backbone type (heads follow the backbone's widths).
_RESNET = dict(depth=18, stem_channels=16, base_channels=8)  # widths 8..64
SHRINK = {
    'ConvNeXtCvSt': dict(
        backbone=dict(
            arch=dict(_delete_=True, depths=[1, 1, 1, 1], channels=[8, 16, 32, 64])
        ),
        decode_head=dict(in_channels=[8, 16, 32, 64], channels=16),
        auxiliary_head=dict(in_channels=32, channels=8),
    ),
    'VisionTransformerStrict': dict(
        backbone=dict(embed_dims=64, num_layers=1, num_heads=2),
        decode_head=dict(
            in_channels=64, channels=64, embed_dims=64, num_layers=1, num_heads=2
        ),
    ),
    'ResNetV1c': dict(
        backbone=_RESNET,
        decode_head=dict(in_channels=64, channels=16),
        auxiliary_head=dict(in_channels=32, channels=16),
    ),
}

# Shipped configs: training config -> (dataset fixture, evaluation config or None
# for --cfg-options evaluator=SEA).
# Configs that equal another one up to what the test shrinks or what other tests
# run do not train here a second time:
# - the ConvNeXt-S-CvSt configs differ from their ConvNeXt-T-CvSt twins only in
#   the backbone's arch, drop-path rate and pretrained checkpoint
#   (test_convnext_s_configs_differ_from_t_only_in_the_backbone_size): once shrunk
#   they are the same run up to the drop-path rate (the S configs load and follow
#   the protocol in tests/test_configs.py);
# - the short name upernet_convnext_t_ade20k.py is its full config
#   (tests/test_configs.py, test_short_config_names_are_their_full_configs) and
#   trains below through tools/dist_train.sh
#   (test_design_card_command_dist_train_short_name);
# - a *_pirat-leak_* config is its recipe plus train_cfg.leak_attack_grads=True
#   (tests/test_configs.py, test_leak_variant_is_its_recipe_with_the_leak), and is
#   evaluated by its recipe's _sea config: the same pipeline, model and
#   evaluation as its recipe's case; the leak itself trains in
#   tests/test_adversarial_training.py (test_leak_*);
# - the *_reference-protocol configs train as their base and evaluate with
#   another test protocol: tests/test_slide_softmax.py runs them.
SHORT_NAMES = ('upernet_convnext_t_ade20k.py',)
TRAIN_CONFIGS = sorted(
    p
    for d in ('pirat', 'sat', 'ddcat')
    for p in glob.glob(osp.join(REPO, 'configs', d, '*.py'))
    if not p.endswith(('_sea.py', '_reference-protocol.py'))
    and 'convnext-s-cvst' not in osp.basename(p)
    and '_pirat-leak_' not in osp.basename(p)
    and osp.basename(p) not in SHORT_NAMES
)


def test_convnext_s_configs_differ_from_t_only_in_the_backbone_size():
    from mmengine.config import Config

    s_configs = sorted(
        p
        for p in glob.glob(osp.join(REPO, 'configs', 'pirat', '*convnext-s-cvst*.py'))
        if not p.endswith('_sea.py')
    )
    # 2 datasets x PIR-AT, its leaking variant, clean
    assert len(s_configs) == 6
    for path in s_configs:
        small = Config.fromfile(path).to_dict()
        tiny = Config.fromfile(path.replace('convnext-s-cvst', 'convnext-t-cvst'))
        tiny = tiny.to_dict()
        differ = {k for k in set(small) | set(tiny) if small.get(k) != tiny.get(k)}
        assert differ == {'model'}, path
        model_differ = {
            k for k in small['model'] if small['model'][k] != tiny['model'].get(k)
        }
        assert model_differ == {'backbone'}, path
        backbone_differ = {
            k
            for k in small['model']['backbone']
            if small['model']['backbone'][k] != tiny['model']['backbone'].get(k)
        }
        assert backbone_differ == {'arch', 'drop_path_rate', 'init_cfg'}, path


def test_every_config_left_out_of_the_matrix_trains_as_its_twin():
    """The leaking variants and the short names train here as the config they
    equal (tests/test_configs.py checks the equality)."""
    trained = {osp.basename(p) for p in TRAIN_CONFIGS}
    pirat = glob.glob(osp.join(REPO, 'configs', 'pirat', '*.py'))
    leak = [osp.basename(p) for p in pirat if '_pirat-leak_' in osp.basename(p)]
    assert leak
    for name in leak:
        if 'convnext-s-cvst' not in name:
            assert name.replace('_pirat-leak_', '_pirat_') in trained, name
    for name in SHORT_NAMES:
        text = open(osp.join(REPO, 'configs', 'pirat', name)).read()
        (base,) = re.findall(r"^_base_ = '\./(.+)'$", text, re.M)
        assert base in trained, (name, base)


def _dataset_fixture(path):
    name = osp.basename(path)
    if 'ade20k' in name:
        return 'mini_ade20k'
    if 'voc12aug' in name:
        return 'mini_voc'
    if 'cityscapes' in name:
        return 'mini_cityscapes'
    raise AssertionError(f'no miniature dataset for {name}')


def _sea_config(path):
    sea = path[:-3] + '_sea.py'
    return sea if osp.exists(sea) else None


def _rel(path):
    return osp.relpath(path, REPO)


def data_root_options(cfg, root):
    """--cfg-options setting every ``data_root`` of the dataloaders to ``root``
    (also inside ``ConcatDataset``s), with in-process loading."""
    opts = []

    def walk(node, key):
        if isinstance(node, dict):
            if 'data_root' in node:
                opts.append(f'{key}.data_root={root}')
            for k in ('dataset', 'datasets'):
                if k in node:
                    walk(node[k], f'{key}.{k}')
        elif isinstance(node, (list, tuple)):
            for i, item in enumerate(node):
                walk(item, f'{key}.{i}')

    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        if cfg.get(loader):
            walk(cfg[loader].get('dataset'), f'{loader}.dataset')
            opts += [f'{loader}.num_workers=0', f'{loader}.persistent_workers=False']
    return opts


def _model_shrink(cfg):
    backbone = cfg.model.backbone.type
    if backbone not in SHRINK:
        raise AssertionError(f'no shrink rule for backbone {backbone}')
    shrink = dict(SHRINK[backbone])
    shrink['backbone'] = dict(shrink['backbone'], init_cfg=None)
    if 'auxiliary_head' in shrink and not cfg.model.get('auxiliary_head'):
        shrink.pop('auxiliary_head')
    return shrink


def write_child(tmp_path, base, name, model=None, extra=''):
    """A test-only config: ``base`` with the model shrunk and a short run (the
    training attack, if any, with one step; 2 images per batch: SAT/DDC-AT split
    each batch into a clean and an adversarial half, and BatchNorm after PPM's
    1x1 pooling needs more than one value per channel)."""
    cfg = Config.fromfile(base)
    adversarial = cfg.train_cfg.get('type') == 'AdversarialTrainLoop'
    text = [f'_base_ = {base!r}']
    if model:
        text.append(f'model = {model!r}')
    attack = ', attack=dict(steps=1)' if adversarial else ''
    text += [
        f'train_cfg = dict(max_iters={ITERS}, val_begin=10**9{attack})',
        'default_hooks = dict(checkpoint=dict(interval=%d, by_epoch=False), '
        'logger=dict(interval=1))' % ITERS,
        'train_dataloader = dict(batch_size=2)',
        'randomness = dict(seed=0)',
        extra,
    ]
    path = tmp_path / name
    path.write_text('\n'.join(text) + '\n')
    return str(path)


def _run_tools(tools_in_one_process, *invocations):
    """Run stock tools (``[script, args...]`` each) in this interpreter, one
    after the other, as ``python script args`` would (tests/
    tools_in_one_process.py: the ~8 s import of torch/mmseg is paid once per
    test worker, not once per tool)."""
    import sys

    argv = []
    for inv in invocations:
        argv += ([':::'] if argv else []) + [str(a) for a in inv]
    saved = list(sys.argv)
    try:
        tools_in_one_process.main(argv)
    finally:
        sys.argv = saved


def _log_text(work_dir):
    logs = sorted(glob.glob(osp.join(str(work_dir), '*', '*.log')))
    assert logs, f'no log in {work_dir}'
    with open(logs[-1]) as f:
        return f.read()


def _train_then_sea(tools, tmp_path, train_cfg, sea_cfg, root, eval_opts):
    """tools/train.py a few iterations, then tools/test.py with SEA on the
    checkpoint; returns the robustness results (JSON) and the training log."""
    work, test_work = tmp_path / 'train', tmp_path / 'test'
    ckpt = work / f'iter_{ITERS}.pth'
    _run_tools(
        tools,
        [
            osp.join(REPO, 'tools', 'train.py'),
            train_cfg,
            '--work-dir',
            work,
            '--cfg-options',
            *data_root_options(Config.fromfile(train_cfg), root),
        ],
        [
            osp.join(REPO, 'tools', 'test.py'),
            sea_cfg,
            ckpt,
            '--work-dir',
            test_work,
            '--cfg-options',
            *data_root_options(Config.fromfile(sea_cfg), root),
            *eval_opts,
        ],
    )
    train_log = _log_text(work)
    assert f'Iter(train) [{ITERS}/{ITERS}]' in train_log, train_log[-3000:]
    results = sorted(glob.glob(str(test_work / 'robustness_*.json')))
    assert results, _log_text(test_work)[-3000:]
    with open(results[-1]) as f:
        return json.load(f), train_log


def _check_sea(result, num_images, eps=4):
    """The results name clean and SEA numbers, SEA never above clean."""
    summary = result['summary']
    clean = summary['clean']
    worst = summary['eps'][f'{eps:g}']['worst_case']
    assert len(summary['eps'][f'{eps:g}']['attacks']) == 3  # SEA's members
    assert summary['num_images'] == num_images
    assert 0 <= worst['mIoU'] <= clean['mIoU'] + 1e-9, (worst, clean)
    assert worst['aAcc_img'] <= clean['aAcc_img'] + 1e-9, (worst, clean)


# SEA shrunk to a few iterations at one radius; the evaluation pipelines are the
# configs' own.
SEA_OPTIONS = ['test_cfg.eps=[4]', f'test_cfg.attacks.0.steps={SEA_ITERS}']
EVALUATOR_SEA = ['evaluator=SEA', 'evaluator.eps=4', f'evaluator.n_iter={SEA_ITERS}']
# SEA on one validation image (the 151-class ADE20K logits at 512 x 512 and
# the sliding windows of the Cityscapes configs make every pass costly)
ONE = 'test_dataloader = dict(dataset=dict(indices=1))'
# ADE20K: its second validation image, the smallest (341 x 256; the pipeline
# resizes it to a short side of 512, the labels stay at its size, as mmseg
# evaluates): a pass costs a quarter of the first image's on the 151-class logits
ONE_ADE20K = 'test_dataloader = dict(dataset=dict(indices=[1]))'


def _one_image(dataset):
    """The test-set override of one validation image for a dataset fixture."""
    return ONE_ADE20K if dataset == 'mini_ade20k' else ONE


@pytest.mark.parametrize('config', TRAIN_CONFIGS, ids=_rel)
def test_shipped_config_trains_and_evaluates(
    config, request, tmp_path, tools_in_one_process, reset_mmengine
):
    dataset = _dataset_fixture(config)
    root = request.getfixturevalue(dataset)
    cfg = Config.fromfile(config)
    shrink = _model_shrink(cfg)
    name = osp.basename(config)
    train_cfg = write_child(tmp_path, config, name, shrink)
    sea = _sea_config(config)
    if sea is not None:
        sea_cfg = write_child(
            tmp_path, sea, 'sea_' + name, shrink, extra=_one_image(dataset)
        )
        eval_opts = SEA_OPTIONS
    else:
        sea_cfg = write_child(
            tmp_path, config, 'sea_' + name, shrink, extra=_one_image(dataset)
        )
        eval_opts = EVALUATOR_SEA
    result, log = _train_then_sea(
        tools_in_one_process, tmp_path, train_cfg, sea_cfg, root, eval_opts
    )
    if Config.fromfile(train_cfg).train_cfg.type == 'AdversarialTrainLoop':
        assert 'adv.acc' in log
    _check_sea(result, num_images=1)


# mmseg's own model zoo (configs shipped inside the mmsegmentation package, read
# through mmengine's ``mmseg::`` prefix). Families: whole and slide inference, a
# CascadeEncoderDecoder (OCRNet), transformers (SegFormer, Segmenter), auxiliary
# heads (PSPNet, DeepLabv3+, UperNet); the ADE20K pipelines have
# PhotoMetricDistortion.
_RESNET_HEADS = dict(
    backbone=_RESNET,
    decode_head=dict(in_channels=64, channels=16),
    auxiliary_head=dict(in_channels=32, channels=16),
)


def _hrnet_ocr_shrink(cfg):
    """HRNet-W18-small + OCR at a fraction of the width and depth (the decode
    heads are a list in the CascadeEncoderDecoder: replaced whole)."""
    widths = [8, 16, 32, 64]
    stages = dict(
        stage1=dict(num_blocks=(1,), num_channels=(16,)),
        stage2=dict(num_blocks=(1, 1), num_channels=tuple(widths[:2])),
        stage3=dict(
            num_modules=1, num_blocks=(1, 1, 1), num_channels=tuple(widths[:3])
        ),
        stage4=dict(num_modules=1, num_blocks=(1, 1, 1, 1), num_channels=tuple(widths)),
    )
    heads = [dict(h) for h in cfg.model.decode_head]
    heads[0].update(in_channels=widths, channels=sum(widths))
    heads[1].update(in_channels=widths, channels=16, ocr_channels=16)
    return dict(backbone=dict(extra=stages), decode_head=heads)


ZOO = [
    # (mmseg config, dataset fixture, scheme, shrunk model)
    (
        'pspnet/pspnet_r50-d8_4xb4-80k_ade20k-512x512.py',
        'mini_ade20k',
        'pirat',
        _RESNET_HEADS,
    ),
    (
        'ocrnet/ocrnet_hr18s_4xb4-80k_ade20k-512x512.py',
        'mini_ade20k',
        'sat',
        _hrnet_ocr_shrink,
    ),
    (
        'segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py',
        'mini_ade20k',
        'pirat',
        dict(backbone=dict(num_layers=[1, 1, 1, 1]), decode_head=dict(channels=32)),
    ),
    (
        'segmenter/segmenter_vit-t_mask_8xb1-160k_ade20k-512x512.py',
        'mini_ade20k',
        'sat',
        dict(
            backbone=dict(embed_dims=64, num_heads=2, num_layers=1),
            decode_head=dict(
                in_channels=64, channels=64, embed_dims=64, num_heads=2, num_layers=1
            ),
        ),
    ),
    (
        'deeplabv3plus/deeplabv3plus_r50-d8_4xb2-40k_cityscapes-512x1024.py',
        'mini_cityscapes',
        'pirat',
        dict(
            backbone=_RESNET,
            decode_head=dict(
                in_channels=64, channels=16, c1_in_channels=8, c1_channels=8
            ),
            auxiliary_head=dict(in_channels=32, channels=16),
        ),
    ),
    (
        'upernet/upernet_r50_4xb2-40k_cityscapes-512x1024.py',
        'mini_cityscapes',
        'sat',
        dict(
            backbone=_RESNET,
            decode_head=dict(in_channels=[8, 16, 32, 64], channels=16),
            auxiliary_head=dict(in_channels=32, channels=16),
        ),
    ),
]

# What the README tells users to write to train any mmseg config adversarially
# (write_child shortens the attack to 1 step for the test).
USER_CONFIG = """_base_ = 'mmseg::{config}'
custom_imports = dict(imports=['mmseg_robust'], allow_failed_imports=False)
train_cfg = dict(
    type='AdversarialTrainLoop',
    scheme='{scheme}',
    attack=dict(type='PGD', eps=4, steps=5, step_size=2.55, random_start=False))
"""


@pytest.mark.parametrize(
    'config, dataset, scheme, shrink', ZOO, ids=[z[0] for z in ZOO]
)
def test_mmseg_zoo_config_trains_adversarially_and_evaluates(
    config,
    dataset,
    scheme,
    shrink,
    request,
    tmp_path,
    tools_in_one_process,
    reset_mmengine,
):
    root = request.getfixturevalue(dataset)
    user = tmp_path / ('adv_' + osp.basename(config))
    user.write_text(USER_CONFIG.format(config=config, scheme=scheme))
    if callable(shrink):
        shrink = shrink(Config.fromfile(str(user)))
    model = dict(shrink, pretrained=None)
    model['backbone'] = dict(model.get('backbone', {}), init_cfg=None)
    child = write_child(
        tmp_path,
        str(user),
        'shrunk_' + osp.basename(config),
        model,
        # one validation image: slide inference of the Cityscapes configs
        # runs 9 windows per forward pass
        extra=_one_image(dataset),
    )
    result, log = _train_then_sea(
        tools_in_one_process, tmp_path, child, child, root, EVALUATOR_SEA
    )
    assert 'adv.acc' in log  # the adversarial loop trained
    _check_sea(result, num_images=1)


def test_design_card_command_dist_train_short_name(
    mini_ade20k, tmp_path, run_tool, free_port
):
    """`tools/dist_train.sh configs/pirat/upernet_convnext_t_ade20k.py N` (here 2
    CPU processes, the model shrunk): PIR-AT on ADE20K's real pipeline."""
    config = osp.join(REPO, 'configs', 'pirat', 'upernet_convnext_t_ade20k.py')
    cfg = Config.fromfile(config)
    child = write_child(
        tmp_path, config, 'upernet_convnext_t_ade20k.py', _model_shrink(cfg)
    )
    work = tmp_path / 'work'
    out = run_tool(
        [
            'bash',
            'tools/dist_train.sh',
            child,
            '2',
            '--work-dir',
            str(work),
            '--cfg-options',
            *data_root_options(cfg, mini_ade20k),
        ],
        env=dict(PORT=free_port(), CUDA_VISIBLE_DEVICES=''),
    )
    assert 'Distributed training: True' in out and 'GPU number: 2' in out
    assert f'Iter(train) [{ITERS}/{ITERS}]' in out and 'adv.acc' in out
    assert (work / f'iter_{ITERS}.pth').exists()
