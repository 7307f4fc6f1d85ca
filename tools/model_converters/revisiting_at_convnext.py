"""Convert a revisiting-at robust ImageNet ConvNeXt-CvSt (timm naming) into a
backbone checkpoint for ``ConvNeXtCvSt`` (PIR-AT init, docs/algorithms.md 5.1 and 7).

    python tools/model_converters/revisiting_at_convnext.py SRC DST [--arch tiny] [--drop-normalizer]

Use DST as ``backbone.init_cfg=dict(type='Pretrained', checkpoint=DST)``.
"""
from _cli import convert, parser


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument('--arch', choices=['tiny', 'small'], default=None,
                   help='expected architecture (default: read from SRC)')
    p.add_argument(
        '--drop-normalizer',
        action='store_true',
        help='accept and drop a non-identity normalize.{mean,std} of SRC (PIR-AT '
        'fine-tunes the backbone on raw [0, 1] input, as the reference does); '
        'the values are kept in the meta of DST')
    args = p.parse_args()
    from mmseg_robust.models.converters import convert_revisiting_at_convnext
    convert(args, convert_revisiting_at_convnext, 'revisiting_at_convnext',
            arch=args.arch,
            drop_normalizer=args.drop_normalizer)


if __name__ == '__main__':
    main()
