"""The model registry and the two helpers every builder shares.

Kept apart from `slt.models.__init__` so the builder modules can import `MODELS`
without importing the package that imports them (no import cycle).
"""

from __future__ import annotations

from slt.errors import ConfigError
from slt.registry import Registry
from slt.spec import DataSpec

MODELS: Registry = Registry("model")


def scaled(channels: int, width: float) -> int:
    """A hidden channel/feature count under the width multiplier (never below 1)."""
    return max(1, round(channels * width))


def image_shape(name: str, spec: DataSpec) -> tuple[int, int, int]:
    """(C, H, W) of the data, or a one-line ConfigError for models that need images."""
    if len(spec.shape) != 3:
        raise ConfigError(
            f"model {name} needs image data (C, H, W); data gives shape {tuple(spec.shape)}"
        )
    c, h, w = (int(s) for s in spec.shape)
    return c, h, w

