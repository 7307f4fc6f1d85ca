"""Convert a revisiting-at / timm ViT (e.g. robust ViT-S) into a backbone checkpoint
for mmseg's ``VisionTransformer`` / our ``VisionTransformerStrict`` (PIR-AT init of
the Segmenter, docs/algorithms.md 5.1 and 7).

    python tools/model_converters/revisiting_at_vit.py SRC DST [--drop-normalizer]

``pos_embed`` keeps the source grid; the backbone resizes it to its ``img_size``
when loading. A ViT-S-CvSt source needs ``backbone=dict(stem='conv')``.
"""
from _cli import convert, parser


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument('--num-heads', type=int, default=None,
                   help='attention heads (default: embed_dims // 64)')
    p.add_argument(
        '--drop-normalizer',
        action='store_true',
        help='accept and drop a non-identity normalize.{mean,std} of SRC (PIR-AT '
        'fine-tunes the backbone on raw [0, 1] input, as the reference does); '
        'the values are kept in the meta of DST')
    args = p.parse_args()
    from mmseg_robust.models.converters import convert_revisiting_at_vit
    convert(args, convert_revisiting_at_vit, 'revisiting_at_vit',
            num_heads=args.num_heads,
            drop_normalizer=args.drop_normalizer)


if __name__ == '__main__':
    main()
