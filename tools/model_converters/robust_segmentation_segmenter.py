"""Convert a released Robust-Segmentation Segmenter ViT-S checkpoint (Croce, Singh &
Hein, ECCV 2024) into a full mmseg checkpoint (docs/algorithms.md 7).

    python tools/model_converters/robust_segmentation_segmenter.py SRC DST \
        [--config configs/_base_/models/segmenter_vit-s_mask.py] [--unsafe-load]

The class count is read from SRC; the output loads strictly into the model of
``configs/pirat/segmenter_vit-s_pirat_8xb14-32e_ade20k151-512x512.py``.
"""

import os.path as osp
import sys

from mmseg_robust.models.converters import convert_robust_segmentation_segmenter
from mmseg_robust.models.converters.cli import convert_file, converter_parser, model_cfg

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEFAULT_CONFIG = osp.join(
    REPO, 'configs', '_base_', 'models', 'segmenter_vit-s_mask.py'
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
        convert_robust_segmentation_segmenter,
        'robust_segmentation_segmenter',
        model_cfg=model_cfg(args.config),
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
