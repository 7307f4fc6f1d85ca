"""Convert DDC-AT / SAT checkpoints of dvlab-research/Robust-Semantic-Segmentation
(and its ImageNet ResNet-50 initialisation) to mmseg checkpoints.

    python tools/model_converters/ddcat_semseg.py SRC DST [--config CFG] [--plain] \
        [--unsafe-load]

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

import os.path as osp
import sys

from mmengine.config import Config

from mmseg_robust.models.checkpoint import (
    CheckpointError,
    conversion_meta,
    expected_shapes,
    load_checkpoint_file,
    save_checkpoint,
    unwrap_state_dict,
)
from mmseg_robust.models.converters import (
    convert_semseg_state_dict,
    detect_semseg_layout,
)
from mmseg_robust.models.converters.cli import converter_parser, print_written

CONFIGS = osp.join(
    osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'configs'
)
_DATASETS = {21: 'voc12aug-473x473', 19: 'cityscapes-449x449'}


def default_config(arch: str, scheme: str, num_classes: int) -> str:
    """Our config for a reference checkpoint (``scheme``: 'plain' or 'ddcat')."""
    if arch == 'resnet':
        arch, scheme, num_classes = 'pspnet', 'plain', 21
    if num_classes not in _DATASETS:
        raise CheckpointError(
            f'{num_classes} classes: not VOC (21) or Cityscapes (19); name the '
            'target config with --config'
        )
    kind = 'ddcat' if scheme == 'ddcat' else 'sat'
    return osp.join(CONFIGS, kind, f'{arch}_r50-d8_{kind}_{_DATASETS[num_classes]}.py')


def parse_args(argv=None):
    parser = converter_parser(
        'Convert DDC-AT/SAT (semseg) checkpoints to mmseg',
        src_help='reference checkpoint',
        dst_help='output mmseg checkpoint',
    )
    parser.add_argument(
        '--config', help='target mmseg config (default: ours for the detected model)'
    )
    parser.add_argument(
        '--plain',
        action='store_true',
        help='DDC-AT: drop cls2/mask1, i.e. write the deployed plain model',
    )
    return parser.parse_args(argv)


def convert(
    src: str,
    dst: str,
    config: str = None,
    plain: bool = False,
    unsafe_load: bool = False,
) -> dict:
    """Convert ``src`` to ``dst``; returns a summary (layout, config, tensors)."""
    sd = unwrap_state_dict(load_checkpoint_file(src, trust=unsafe_load), src)
    layout = detect_semseg_layout(sd)
    if plain and layout.scheme != 'ddcat':
        raise CheckpointError(
            '--plain applies to DDC-AT checkpoints only; this one is '
            f'{layout.arch}/{layout.scheme}'
        )
    scheme = 'plain' if plain else layout.scheme
    config = config or default_config(layout.arch, scheme, layout.num_classes)
    cfg = Config.fromfile(config)
    prefix = 'backbone.' if layout.arch == 'resnet' else None
    expected = expected_shapes(cfg.model, prefix=prefix)
    drop = ('cls2.', 'mask1.') if plain else ()
    out = convert_semseg_state_dict(sd, expected=expected, drop=drop)
    # in the source's naming; the ImageNet classifier of a ResNet always goes
    left_out = drop + (('fc.',) if layout.arch == 'resnet' else ())
    dropped = [k for k in sd if left_out and k.startswith(left_out)]
    meta = conversion_meta(
        'ddcat_semseg',
        src,
        dropped,
        config,
        layout=layout._asdict(),
        plain=plain,
    )
    save_checkpoint(dst, out, meta)
    return dict(layout=layout, config=config, tensors=len(out))


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = convert(args.src, args.dst, args.config, args.plain, args.unsafe_load)
    layout = summary['layout']
    print(
        f'{layout.arch}/{layout.scheme}, {layout.num_classes} classes: '
        f'{summary["tensors"]} tensors, for the config {summary["config"]}'
    )
    print_written(args.dst)
    return 0


if __name__ == '__main__':
    sys.exit(main())
