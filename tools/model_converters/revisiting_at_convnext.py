"""Convert a revisiting-at robust ImageNet ConvNeXt-CvSt (timm naming) into a
backbone checkpoint for ``ConvNeXtCvSt`` (PIR-AT init, ALGORITHMS.md 5.1 and 7).

    python tools/model_converters/revisiting_at_convnext.py SRC DST [--arch tiny]

Use DST as ``backbone.init_cfg=dict(type='Pretrained', checkpoint=DST)``.
"""
from _cli import convert, parser


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument('--arch', choices=['tiny', 'small'], default=None,
                   help='expected architecture (default: read from SRC)')
    args = p.parse_args()
    from mmseg_robust.models.converters import convert_revisiting_at_convnext
    convert(args, convert_revisiting_at_convnext, 'revisiting_at_convnext',
            arch=args.arch)


if __name__ == '__main__':
    main()
