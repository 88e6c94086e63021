"""Conv-2/4/6/8 of the edge-popup paper (Ramanujan et al. 2020, allenai/hidden-networks).

Blocks of two 3x3 convs + ReLU and a 2x2 max-pool (64, 128, 256, 512 channels), then
fully connected 256 -> 256 -> classes. No BatchNorm, as published.
"""

from __future__ import annotations

from torch import nn

from slt.config.schema import ModelConfig
from slt.errors import ConfigError
from slt.layers import MaskedConv2d, MaskedLinear
from slt.models.registry import MODELS, image_shape, scaled
from slt.spec import DataSpec

BLOCK_CHANNELS = (64, 128, 256, 512)
FC_HIDDEN = 256


def conv_n(name: str, blocks: int, cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """Conv-(2 * blocks); the flatten size follows the input's height and width."""
    c, h, w = image_shape(name, spec)
    layers: list[nn.Module] = []
    for channels in BLOCK_CHANNELS[:blocks]:
        out = scaled(channels, cfg.width)
        layers += [
            MaskedConv2d(c, out, 3, padding=1), nn.ReLU(inplace=True),
            MaskedConv2d(out, out, 3, padding=1), nn.ReLU(inplace=True),
        ]
        if h < 2 or w < 2:
            raise ConfigError(
                f"model {name} needs images of at least {2 ** blocks}x{2 ** blocks} "
                f"(it max-pools {blocks} times); data gives shape {tuple(spec.shape)}"
            )
        layers.append(nn.MaxPool2d(2))
        c, h, w = out, h // 2, w // 2
    fc = scaled(FC_HIDDEN, cfg.width)
    layers += [
        nn.Flatten(),
        MaskedLinear(c * h * w, fc), nn.ReLU(inplace=True),
        MaskedLinear(fc, fc), nn.ReLU(inplace=True),
        MaskedLinear(fc, spec.num_classes),
    ]
    return nn.Sequential(*layers)


def _register(blocks: int) -> None:
    """conv2 .. conv8: `blocks` blocks of two convs (64, 128, 256, 512 channels)."""
    name = f"conv{2 * blocks}"

    def build(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
        return conv_n(name, blocks, cfg, spec)

    build.__doc__ = f"{blocks} block(s) of the edge-popup Conv-N family."
    MODELS.register(name)(build)


for _blocks in (1, 2, 3, 4):
    _register(_blocks)
