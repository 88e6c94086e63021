"""Architectures for the search: every conv/linear is a Masked layer, registered in forward order.

A builder only lays out the architecture; the network builder (`slt.network`) installs the
frozen weights and the source mask on each `masked_layers(model)` entry afterwards.
"""

from __future__ import annotations

from torch import nn

from slt.config import ModelConfig
from slt.models import conv, mlp, resnet, vgg  # noqa: F401  (they register their builders)
from slt.models.registry import MODELS
from slt.spec import DataSpec

__all__ = ["MODELS", "build_model"]


def build_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """The architecture named by `cfg.name`, sized for the data described by `spec`."""
    return MODELS.get(cfg.name)(cfg, spec)
