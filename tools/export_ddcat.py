"""Export a trained DDC-AT model as the plain PSPNet / DeepLabv3 / UperNet it
deploys as.

    python tools/export_ddcat.py CONFIG CKPT OUT [--out-config PLAIN_CONFIG]

CONFIG is the DDC-AT training config (e.g. configs/ddcat/*.py), CKPT a checkpoint
trained with it. Writes OUT, an mmseg checkpoint (``meta``, ``state_dict``) of the
plain segmentor -- cls2 and mask1 dropped, cls1 being the plain head's own
``bottleneck``/``conv_seg`` (UperNet: ``fpn_bottleneck``/``conv_seg``) -- that
loads strictly into the plain config, and that plain config (default: OUT with the
suffix ``.py``). The plain model's logits are cls1's, so test it with any tool,
e.g.::

    python tools/test.py OUT.py OUT --cfg-options evaluator=SEA
"""
import argparse
import copy
import os.path as osp
import sys
from collections import OrderedDict

import torch
from mmengine.config import Config

import mmseg_robust  # noqa: F401  (registers our modules, compatibility fixes)
from mmseg_robust.models.converters_semseg import (check_state_dict,
                                                   expected_state_shapes)
from mmseg_robust.models.ddcat_export import (export_plain_state_dict,
                                              plain_model_cfg)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a DDC-AT model as a plain mmseg segmentor')
    parser.add_argument('config', help='DDC-AT config the checkpoint was trained with')
    parser.add_argument('checkpoint', help='DDC-AT checkpoint')
    parser.add_argument('out', help='output checkpoint of the plain model')
    parser.add_argument(
        '--out-config',
        help='output config of the plain model (default: OUT with suffix .py)')
    return parser.parse_args(argv)


def plain_state_shapes(model_cfg) -> 'OrderedDict[str, tuple]':
    """Names and shapes of the plain model's state dict. Built on the meta device
    (:func:`expected_state_shapes`, no memory) where possible; models that cannot
    be built there (mmpretrain's ConvNeXt calls ``.item()`` on its drop-path
    rates) are built on the CPU, without initialising weights."""
    try:
        return expected_state_shapes(model_cfg)
    except (RuntimeError, NotImplementedError):
        from mmengine.registry import DefaultScope

        from mmseg_robust.registry import MODELS
        with DefaultScope.overwrite_default_scope('mmseg'):
            model = MODELS.build(model_cfg)
        return OrderedDict(
            (k, tuple(v.shape)) for k, v in model.state_dict().items())


def export(config: str, checkpoint: str, out: str, out_config: str = None) -> str:
    """Write the plain checkpoint ``out`` and its config; returns the config path."""
    cfg = Config.fromfile(config)
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.model = plain_model_cfg(cfg.model)
    ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
    state_dict = ckpt.get('state_dict', ckpt)
    plain = export_plain_state_dict(state_dict)
    check_state_dict(
        plain,
        plain_state_shapes(plain_cfg.model),
        fill_num_batches_tracked=False)
    meta = dict(ckpt.get('meta', {})) if isinstance(ckpt.get('meta'), dict) else {}
    meta['cfg'] = plain_cfg.pretty_text
    meta['ddcat_export'] = dict(
        source_checkpoint=osp.abspath(checkpoint),
        source_config=osp.abspath(config),
        dropped=sorted(set(state_dict) - set(plain)))
    torch.save(dict(meta=meta, state_dict=plain), out)
    torch.load(out, map_location='cpu', weights_only=True)  # loadable safely
    out_config = out_config or osp.splitext(out)[0] + '.py'
    plain_cfg.dump(out_config)
    return out_config


def main(argv=None) -> int:
    args = parse_args(argv)
    out_config = export(args.config, args.checkpoint, args.out, args.out_config)
    print(f'plain checkpoint: {args.out}\nplain config:     {out_config}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
