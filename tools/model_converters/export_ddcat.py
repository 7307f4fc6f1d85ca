"""Export a trained DDC-AT model as the plain PSPNet / DeepLabv3 / UperNet it
deploys as.

    python tools/model_converters/export_ddcat.py CONFIG CKPT OUT \
        [--out-config PLAIN_CONFIG] [--unsafe-load]

CONFIG is the DDC-AT training config (e.g. configs/ddcat/*.py), CKPT a checkpoint
trained with it. Writes OUT, an mmseg checkpoint (``meta``, ``state_dict``) of the
plain segmentor -- cls2 and mask1 dropped, cls1 being the plain head's own
``bottleneck``/``conv_seg`` (UperNet: ``fpn_bottleneck``/``conv_seg``) -- that
loads strictly into the plain config, and that plain config (default: OUT with the
suffix ``.py``). The plain model's logits are cls1's, so test it with any tool,
e.g.::

    python tools/test.py OUT.py OUT --cfg-options evaluator=SEA
"""

import copy
import os.path as osp
import sys

import torch
from mmengine.config import Config

from mmseg_robust.models.checkpoint import (
    CONVERSION_META_KEYS,
    check_state_dict,
    conversion_meta,
    expected_shapes,
    load_checkpoint_file,
    save_checkpoint,
    unwrap_state_dict,
)
from mmseg_robust.models.converters import export_plain_state_dict, plain_model_cfg
from mmseg_robust.models.converters.cli import converter_parser, print_written


def parse_args(argv=None):
    parser = converter_parser(
        'Export a DDC-AT model as a plain mmseg segmentor',
        src='CKPT',
        src_help='DDC-AT checkpoint',
        dst='OUT',
        dst_help='output checkpoint of the plain model',
        before=[('config', 'DDC-AT config the checkpoint was trained with')],
    )
    parser.add_argument(
        '--out-config',
        help='output config of the plain model (default: OUT with suffix .py)',
    )
    return parser.parse_args(argv)


def export(
    config: str,
    checkpoint: str,
    out: str,
    out_config: str = None,
    unsafe_load: bool = False,
) -> str:
    """Write the plain checkpoint ``out`` and its config; returns the config path."""
    cfg = Config.fromfile(config)
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.model = plain_model_cfg(cfg.model)
    ckpt = load_checkpoint_file(checkpoint, trust=unsafe_load)
    state_dict = unwrap_state_dict(ckpt, checkpoint)
    plain = export_plain_state_dict(state_dict)
    check_state_dict(
        plain,
        expected_shapes(plain_cfg.model),
        what=f'{checkpoint} without the DDC-AT branches',
        hint=f'Is {config} the config {checkpoint} was trained with?',
    )
    meta = ckpt.get('meta') if isinstance(ckpt, dict) else None
    meta = dict(meta) if isinstance(meta, dict) else {}
    for key in CONVERSION_META_KEYS:  # the source's own, if it was converted
        meta.pop(key, None)
    # mmengine's keys stay (cfg becomes the plain model's), the provenance is ours
    meta = dict(
        meta,
        cfg=plain_cfg.pretty_text,
        **conversion_meta(
            'export_ddcat', checkpoint, sorted(set(state_dict) - set(plain)), config
        ),
    )
    save_checkpoint(out, plain, meta)
    if unsafe_load:  # the source's meta may hold objects the safe loader refuses
        torch.load(out, map_location='cpu', weights_only=True)
    out_config = out_config or osp.splitext(out)[0] + '.py'
    plain_cfg.dump(out_config)
    return out_config


def main(argv=None) -> int:
    args = parse_args(argv)
    out_config = export(
        args.config, args.src, args.dst, args.out_config, args.unsafe_load
    )
    print_written(args.dst, 'plain checkpoint')
    print_written(out_config, 'plain config')
    return 0


if __name__ == '__main__':
    sys.exit(main())
