"""DeepLabv3's ASPP head with the 1x1 bottleneck of the paper and of DDC-AT.

mmseg's :class:`~mmseg.models.decode_heads.ASPPHead` fuses the concatenated ASPP
branches with a 3x3 convolution. DeepLabv3 (Chen et al., 2017, section 3.3) and the
DDC-AT/SAT reference models (``dvlab-research/Robust-Semantic-Segmentation``, the
``cls.0`` layer) use a 1x1 convolution there; this head makes the kernel size an
argument so that those checkpoints load, and the plain model exported from a
DDC-AT DeepLabv3 is a standard DeepLabv3.
"""

from mmcv.cnn import ConvModule
from mmseg.models.decode_heads import ASPPHead

from mmseg_robust.registry import MODELS

__all__ = ['DeepLabV3Head']


@MODELS.register_module()
class DeepLabV3Head(ASPPHead):
    """ASPP head (image pooling + 1x1 + three atrous 3x3 branches) whose
    bottleneck kernel size is configurable.

    Everything else is mmseg's ``ASPPHead``: branch order in the concatenation is
    ``[image_pool, aspp_modules...]``, then ``bottleneck``, dropout, ``conv_seg``.

    Args:
        bottleneck_kernel_size (int): kernel size of the convolution fusing the
            concatenated branches. Default: 1 (DeepLabv3 paper, DDC-AT reference);
            3 gives exactly mmseg's ``ASPPHead``.
        **kwargs: arguments of :class:`~mmseg.models.decode_heads.ASPPHead`
            (``dilations=(1, 6, 12, 18)``, ``in_channels``, ``channels``, ...).

    Example:
        >>> head = MODELS.build(dict(type='DeepLabV3Head', in_channels=2048,
        ...     channels=256, num_classes=21, dilations=(1, 6, 12, 18)))
    """

    def __init__(self, bottleneck_kernel_size: int = 1, **kwargs):
        super().__init__(**kwargs)
        if bottleneck_kernel_size % 2 != 1:
            raise ValueError(
                f'bottleneck_kernel_size must be odd, got {bottleneck_kernel_size}'
            )
        self.bottleneck_kernel_size = bottleneck_kernel_size
        if bottleneck_kernel_size != self.bottleneck.conv.kernel_size[0]:
            self.bottleneck = ConvModule(
                (len(self.dilations) + 1) * self.channels,
                self.channels,
                bottleneck_kernel_size,
                padding=bottleneck_kernel_size // 2,
                conv_cfg=self.conv_cfg,
                norm_cfg=self.norm_cfg,
                act_cfg=self.act_cfg,
            )
