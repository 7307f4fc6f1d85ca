"""Convert a revisiting-at robust ImageNet ConvNeXt-CvSt (timm naming) into a
backbone checkpoint for ``ConvNeXtCvSt`` (PIR-AT init, docs/algorithms.md 5.1 and 7).

    python tools/model_converters/revisiting_at_convnext.py SRC DST [--arch tiny] \
        [--drop-normalizer] [--unsafe-load]

Use DST as ``backbone.init_cfg=dict(type='Pretrained', checkpoint=DST)``.
"""

import sys

from mmseg_robust.models.converters import convert_revisiting_at_convnext
from mmseg_robust.models.converters.cli import convert_file, converter_parser


def main(argv=None) -> int:
    p = converter_parser(__doc__.splitlines()[0], drop_normalizer=True)
    p.add_argument(
        '--arch',
        choices=['tiny', 'small'],
        default=None,
        help='expected architecture (default: read from SRC)',
    )
    args = p.parse_args(argv)
    convert_file(
        args,
        convert_revisiting_at_convnext,
        'revisiting_at_convnext',
        arch=args.arch,
        drop_normalizer=args.drop_normalizer,
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
