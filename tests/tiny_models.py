"""Tiny mmseg models for the unit tests (tests/conftest.py's ``tiny_models`` fixture).

- ``tiny_segmentor_cfg(decode_head, num_classes=4)``: an ``EncoderDecoder`` with a
  narrow deep-stem ResNetV1c-50 at output stride 8 (the layout of the SAT/DDC-AT
  configs at widths 8..64), the given decode head (PSP/ASPP style, on the last
  stage's 64 channels) and an FCN auxiliary head;
- ``trained_like(model)``: random weights and BatchNorm statistics everywhere (not
  the init, whose zeros and ones hide mistakes), in eval mode.
"""

import torch
import torch.nn as nn


def tiny_segmentor_cfg(decode_head, num_classes=4):
    """The model dict; ``decode_head`` is a head type name or a partial dict."""
    norm = dict(type='BN', requires_grad=True)
    if isinstance(decode_head, str):
        decode_head = dict(type=decode_head)
    head = dict(
        in_channels=64,
        in_index=3,
        channels=16,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm,
        align_corners=True,
    )
    if decode_head['type'].split('.')[-1] in ('DDCATASPPHead', 'ASPPHead'):
        head['dilations'] = (1, 2, 3, 4)
    head.update(decode_head)
    return dict(
        type='EncoderDecoder',
        data_preprocessor=dict(
            type='SegDataPreProcessor',
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            bgr_to_rgb=True,
        ),
        backbone=dict(
            type='ResNetV1c',
            depth=50,
            stem_channels=8,
            base_channels=2,
            dilations=(1, 1, 2, 4),
            strides=(1, 2, 1, 1),
            norm_cfg=norm,
            contract_dilation=False,
        ),
        decode_head=head,
        auxiliary_head=dict(
            type='FCNHead',
            in_channels=32,
            in_index=2,
            channels=8,
            num_convs=1,
            concat_input=False,
            num_classes=num_classes,
            norm_cfg=norm,
            align_corners=True,
        ),
        train_cfg=dict(),
        test_cfg=dict(mode='whole'),
    )


def trained_like(model, seed=0):
    """Random weights everywhere, BN statistics included (not the init)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.3)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()
