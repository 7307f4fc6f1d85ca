"""Convert a revisiting-at / timm ViT (e.g. robust ViT-S) into a backbone checkpoint
for mmseg's ``VisionTransformer`` / our ``VisionTransformerStrict`` (PIR-AT init of
the Segmenter, docs/algorithms.md 5.1 and 7).

    python tools/model_converters/revisiting_at_vit.py SRC DST [--drop-normalizer] \
        [--unsafe-load]

``pos_embed`` keeps the source grid; the backbone resizes it to its ``img_size``
when loading. A ViT-S-CvSt source needs ``backbone=dict(stem='conv')``.
"""

import sys

from mmseg_robust.models.converters import convert_revisiting_at_vit
from mmseg_robust.models.converters.cli import convert_file, converter_parser


def main(argv=None) -> int:
    p = converter_parser(__doc__.splitlines()[0], drop_normalizer=True)
    p.add_argument(
        '--num-heads',
        type=int,
        default=None,
        help='attention heads (default: embed_dims // 64)',
    )
    args = p.parse_args(argv)
    convert_file(
        args,
        convert_revisiting_at_vit,
        'revisiting_at_vit',
        num_heads=args.num_heads,
        drop_normalizer=args.drop_normalizer,
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
