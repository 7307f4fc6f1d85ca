"""Convert a released Robust-Segmentation UperNet-ConvNeXt-T/S-CvSt checkpoint
(Croce, Singh & Hein, ECCV 2024) into a full mmseg checkpoint (docs/algorithms.md 7).

    python tools/model_converters/robust_segmentation_upernet.py SRC DST \
        [--config configs/_base_/models/upernet_convnext_cvst.py] [--unsafe-load]

The architecture (tiny/small) and the class count (21 VOC, 151 ADE20K) are read
from SRC; the output loads strictly into the model of the matching
``configs/pirat/upernet_convnext-*-cvst_*`` config, e.g. for SEA:
``python tools/test.py configs/pirat/..._sea.py DST``.
"""

import os.path as osp
import sys

from mmseg_robust.models.converters import convert_robust_segmentation_upernet
from mmseg_robust.models.converters.cli import convert_file, converter_parser, model_cfg

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEFAULT_CONFIG = osp.join(
    REPO, 'configs', '_base_', 'models', 'upernet_convnext_cvst.py'
)


def main(argv=None) -> int:
    p = converter_parser(__doc__.splitlines()[0])
    p.add_argument(
        '--config',
        default=DEFAULT_CONFIG,
        help='mmseg config whose model is the target layout',
    )
    args = p.parse_args(argv)
    convert_file(
        args,
        convert_robust_segmentation_upernet,
        'robust_segmentation_upernet',
        model_cfg=model_cfg(args.config),
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
