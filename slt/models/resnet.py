"""CIFAR-style ResNets: ResNet-18/50 (stages 64..512) and ResNet-20 (He et al. 2016).

The stem is a stride-1 3x3 conv without max-pool, as usual for 32x32 inputs. In each
block the shortcut conv is registered after the main convs, so `masked_layers` lists
layers in the order the forward pass applies them.
"""

from __future__ import annotations

from torch import Tensor, nn

from slt.config.schema import ModelConfig
from slt.layers import MaskedConv2d, MaskedLinear, non_affine_bn
from slt.models.registry import MODELS, image_shape, scaled
from slt.spec import DataSpec


def shortcut(in_ch: int, out_ch: int, stride: int, affine: bool) -> nn.Module:
    """1x1 conv + BN projection when the shape changes, identity otherwise."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(
        MaskedConv2d(in_ch, out_ch, 1, stride=stride), non_affine_bn(out_ch, affine=affine)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; ReLU after the residual sum."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, affine: bool) -> None:
        super().__init__()
        self.conv1 = MaskedConv2d(in_ch, planes, 3, stride=stride, padding=1)
        self.bn1 = non_affine_bn(planes, affine=affine)
        self.conv2 = MaskedConv2d(planes, planes, 3, padding=1)
        self.bn2 = non_affine_bn(planes, affine=affine)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_ch, planes, stride, affine)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4; ReLU after the sum."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, affine: bool) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = MaskedConv2d(in_ch, planes, 1)
        self.bn1 = non_affine_bn(planes, affine=affine)
        self.conv2 = MaskedConv2d(planes, planes, 3, stride=stride, padding=1)
        self.bn2 = non_affine_bn(planes, affine=affine)
        self.conv3 = MaskedConv2d(planes, out_ch, 1)
        self.bn3 = non_affine_bn(out_ch, affine=affine)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_ch, out_ch, stride, affine)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv + BN + ReLU, residual stages, global average pool, masked classifier."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: tuple[int, ...],
        stage_planes: tuple[int, ...],
        strides: tuple[int, ...],
        cfg: ModelConfig,
        spec: DataSpec,
        name: str,
    ) -> None:
        super().__init__()
        in_ch = image_shape(name, spec)[0]
        affine = cfg.bn_affine
        stem = scaled(stage_planes[0], cfg.width)
        self.conv1 = MaskedConv2d(in_ch, stem, 3, padding=1)
        self.bn1 = non_affine_bn(stem, affine=affine)
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        ch = stem
        for depth, planes, stride in zip(depths, stage_planes, strides):
            p = scaled(planes, cfg.width)
            blocks: list[nn.Module] = []
            for i in range(depth):
                blocks.append(block(ch, p, stride if i == 0 else 1, affine))
                ch = p * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = MaskedLinear(ch, spec.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(out).flatten(1))


@MODELS.register("resnet18")
def resnet18(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """BasicBlocks [2, 2, 2, 2] at 64, 128, 256, 512 channels (about 11.2M weights)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), (1, 2, 2, 2), cfg, spec,
                  "resnet18")


@MODELS.register("resnet50")
def resnet50(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """Bottlenecks [3, 4, 6, 3] at 64, 128, 256, 512 planes (outputs x4)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), (1, 2, 2, 2), cfg, spec,
                  "resnet50")


@MODELS.register("resnet20")
def resnet20(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """The CIFAR ResNet-20: three stages of three BasicBlocks at 16, 32, 64 channels."""
    return ResNet(BasicBlock, (3, 3, 3), (16, 32, 64), (1, 2, 2), cfg, spec, "resnet20")
