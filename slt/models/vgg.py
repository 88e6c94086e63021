"""VGG-16 for CIFAR-sized images: 3x3 conv + BN + ReLU stacks, global pool, one classifier."""

from __future__ import annotations

from torch import nn

from slt.config.schema import ModelConfig
from slt.layers import MaskedConv2d, MaskedLinear, non_affine_bn
from slt.models.registry import MODELS, image_shape, scaled
from slt.spec import DataSpec

VGG16: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


@MODELS.register("vgg16")
def vgg16(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """VGG-16 (configuration D) with BatchNorm.

    A max-pool whose input is below 2x2 is skipped, so 28x28 inputs (which reach 1x1
    after four pools) run too; the global average pool makes the head size-independent.
    """
    c, h, w = image_shape("vgg16", spec)
    layers: list[nn.Module] = []
    for item in VGG16:
        if item == "M":
            if h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            continue
        out = scaled(int(item), cfg.width)
        layers += [
            MaskedConv2d(c, out, 3, padding=1),
            non_affine_bn(out, affine=cfg.bn_affine),
            nn.ReLU(inplace=True),
        ]
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), MaskedLinear(c, spec.num_classes)]
    return nn.Sequential(*layers)
