"""What a model needs to know about its data: one example's shape and the class count."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSpec:
    shape: tuple[int, ...]  # one example: (C, H, W) for images, (D,) for vectors
    num_classes: int
