"""`build_model`: the architecture a config names, with every built-in builder registered."""

from __future__ import annotations

from torch import nn

from slt.config.schema import ModelConfig
from slt.models import conv, mlp, resnet, vgg  # noqa: F401  (they register their builders)
from slt.models.registry import MODELS
from slt.spec import DataSpec


def build_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """The architecture named by `cfg.name`, sized for the data described by `spec`."""
    return MODELS.get(cfg.name)(cfg, spec)
