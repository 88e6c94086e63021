"""Fully connected network (LeNet-300-100 by default) on flattened inputs."""

from __future__ import annotations

import math

from torch import nn

from slt.config.schema import ModelConfig
from slt.layers import MaskedLinear
from slt.models.registry import MODELS, scaled
from slt.spec import DataSpec


@MODELS.register("mlp")
def mlp(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """Flatten, then MaskedLinear + ReLU per hidden size, then the classifier; no BatchNorm.

    Flattening first makes it run on images and on vector data alike.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(spec.shape)
    for h in cfg.hidden:
        out = scaled(h, cfg.width)
        layers += [MaskedLinear(fan_in, out), nn.ReLU(inplace=True)]
        fan_in = out
    layers.append(MaskedLinear(fan_in, spec.num_classes))
    return nn.Sequential(*layers)
