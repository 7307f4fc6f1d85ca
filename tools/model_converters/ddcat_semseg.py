"""Convert DDC-AT / SAT checkpoints of dvlab-research/Robust-Semantic-Segmentation
(and its ImageNet ResNet-50 initialisation) to mmseg checkpoints.

    python tools/model_converters/ddcat_semseg.py SRC DST [--config CFG] [--plain]

- PSPNet / DeepLabv3, SAT or no defense (``cls.*``): a checkpoint for
  ``configs/sat/{pspnet,deeplabv3}_r50-d8_sat_*.py``;
- DDC-AT (``cls1/cls2/mask1.*``): a checkpoint for ``configs/ddcat/*.py``; with
  ``--plain`` directly the deployed plain model (cls2, mask1 dropped) for the SAT
  config of the same architecture;
- the reference's ImageNet backbone ``resnet50_v2.pth`` (``conv1 ... layer4, fc``): a
  backbone-relative checkpoint for the configs' ``backbone.init_cfg``
  (``checkpoints/semseg_resnet50_v2_backbone.pth``).

The target config is chosen from the architecture and the class count (21: VOC,
19: Cityscapes) unless ``--config`` names one. The result must fill that model
exactly: any unmapped, missing or wrong-shape tensor stops the conversion with its
name. The written file loads with ``torch.load(..., weights_only=True)``.
"""
import argparse
import os.path as osp
import sys

import torch
from mmengine.config import Config

import mmseg_robust  # noqa: F401  (registers our heads, compatibility fixes)
from mmseg_robust.models.converters_semseg import (CheckpointConversionError,
                                                   convert_semseg_state_dict,
                                                   detect_semseg_layout,
                                                   expected_state_shapes,
                                                   semseg_state_dict)

CONFIGS = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))),
                   'configs')
_DATASETS = {21: 'voc12aug-473x473', 19: 'cityscapes-449x449'}


def default_config(arch: str, scheme: str, num_classes: int) -> str:
    """Our config for a reference checkpoint (``scheme``: 'plain' or 'ddcat')."""
    if arch == 'resnet':
        arch, scheme, num_classes = 'pspnet', 'plain', 21
    if num_classes not in _DATASETS:
        raise CheckpointConversionError(
            f'{num_classes} classes: not VOC (21) or Cityscapes (19); name the '
            'target config with --config')
    kind = 'ddcat' if scheme == 'ddcat' else 'sat'
    return osp.join(CONFIGS, kind,
                    f'{arch}_r50-d8_{kind}_{_DATASETS[num_classes]}.py')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert DDC-AT/SAT (semseg) checkpoints to mmseg')
    parser.add_argument('src', help='reference checkpoint')
    parser.add_argument('dst', help='output mmseg checkpoint')
    parser.add_argument(
        '--config',
        help='target mmseg config (default: ours for the detected model)')
    parser.add_argument(
        '--plain',
        action='store_true',
        help='DDC-AT: drop cls2/mask1, i.e. write the deployed plain model')
    parser.add_argument(
        '--unsafe-load',
        action='store_true',
        help='read SRC with torch.load(weights_only=False): only for files you '
        'trust, if the safe loader refuses them')
    return parser.parse_args(argv)


def convert(src: str, dst: str, config: str = None, plain: bool = False,
            unsafe_load: bool = False) -> dict:
    """Convert ``src`` to ``dst``; returns a summary (layout, config, tensors)."""
    ckpt = torch.load(src, map_location='cpu', weights_only=not unsafe_load)
    sd = semseg_state_dict(ckpt)
    layout = detect_semseg_layout(sd)
    if plain and layout.scheme != 'ddcat':
        raise CheckpointConversionError(
            '--plain applies to DDC-AT checkpoints only; this one is '
            f'{layout.arch}/{layout.scheme}')
    scheme = 'plain' if plain else layout.scheme
    config = config or default_config(layout.arch, scheme, layout.num_classes)
    cfg = Config.fromfile(config)
    prefix = 'backbone.' if layout.arch == 'resnet' else None
    expected = expected_state_shapes(cfg.model, prefix=prefix)
    drop = ('cls2.', 'mask1.') if plain else ()
    out = convert_semseg_state_dict(sd, expected=expected, drop=drop)
    meta = dict(
        converted_from=osp.abspath(src),
        converter='tools/model_converters/ddcat_semseg.py',
        layout=layout._asdict(),
        plain=plain,
        config=osp.abspath(config))
    torch.save(dict(meta=meta, state_dict=out), dst)
    torch.load(dst, map_location='cpu', weights_only=True)  # loadable safely
    return dict(layout=layout, config=config, tensors=len(out))


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = convert(args.src, args.dst, args.config, args.plain,
                      args.unsafe_load)
    layout = summary['layout']
    print(f'{layout.arch}/{layout.scheme}, {layout.num_classes} classes: '
          f'{summary["tensors"]} tensors -> {args.dst}\n'
          f'config: {summary["config"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
