# Segmenter with a ViT-S encoder (d=384, 12 layers, 6 heads, patch 16) and a
# 2-layer mask-transformer decoder, as the SEA/PIR-AT Segmenter (docs/algorithms.md
# section 6): raw [0, 1] RGB input. As in the reference (Strudel et al.'s Segmenter
# code): LayerNorm eps 1e-5, a bias in the patch projection, position embeddings
# resized bilinearly, encoder drop path 0.1, decoder dropout 0.1 and no drop path.
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[0.0, 0.0, 0.0],
    std=[255.0, 255.0, 255.0],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(512, 512),
)  # set to the dataset's crop size
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='VisionTransformerStrict',
        img_size=(512, 512),
        patch_size=16,
        patch_bias=True,
        in_channels=3,
        embed_dims=384,
        num_layers=12,
        num_heads=6,
        drop_path_rate=0.1,
        attn_drop_rate=0.0,
        drop_rate=0.0,
        final_norm=True,
        norm_cfg=dict(type='LN', eps=1e-5),
        with_cls_token=True,
        interpolate_mode='bilinear',
    ),
    decode_head=dict(
        type='SegmenterMaskTransformerHead',
        in_channels=384,
        channels=384,
        num_classes=151,
        num_layers=2,
        num_heads=6,
        embed_dims=384,
        dropout_ratio=0.0,
        drop_path_rate=0.0,
        drop_rate=0.1,
        attn_drop_rate=0.1,
        norm_cfg=dict(type='LN', eps=1e-5),
        loss_decode=dict(
            type='CrossEntropyLoss',
            use_sigmoid=False,
            loss_weight=1.0,
            avg_non_ignore=True,
        ),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'),
)
