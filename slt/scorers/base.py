"""The scoring-rule interface shared by every search method.

A scorer owns three decisions: how a layer's scores start, how the effective compact
weights of all searched layers follow from scores + frozen weights + the ticket budget,
and which boolean mask is the ticket. Selection always goes through `slt.topk`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from slt.layers import MaskedLayer
from slt.topk import segment_offsets, segmented_topk_mask


@dataclass(frozen=True)
class Budget:
    """How many edges the ticket keeps: per layer (scope 'layer') or in total ('global')."""

    scope: str
    layer_k: tuple[int, ...]
    total_k: int

    def segments(self, sizes: Sequence[int]) -> tuple[list[int], list[int]]:
        """Offsets and k per segment of the concatenated per-layer buffer."""
        if self.scope == "global":
            return [0, sum(sizes)], [self.total_k]
        return segment_offsets(sizes), list(self.layer_k)


class StraightThroughTopK(torch.autograd.Function):
    """Forward: 0/1 top-k mask per segment. Backward: the gradient passes straight through
    to the values, as edge-popup's GetSubnet does."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, offsets: list[int], ks: list[int]) -> Tensor:
        return segmented_topk_mask(values.detach(), offsets, ks).to(values.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


class Scorer(ABC):
    """Base of every scoring rule; subclasses register in `slt.scorers.SCORERS`."""

    name: ClassVar[str] = ""

    def init_scores(self, layer: MaskedLayer, gen: torch.Generator) -> Tensor:
        """Compact scores, one per source edge: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which is
        what edge-popup's kaiming_uniform(a=sqrt(5)) gives. Drawn for every edge of the
        layer and then gathered, so an edge starts from the same score in every source."""
        bound = 1.0 / math.sqrt(layer.fan_in)
        dense = (torch.rand(layer.numel, generator=gen) * 2 - 1) * bound
        return dense[layer.src_idx.cpu()]

    @abstractmethod
    def effective_weights(self, layers: Sequence[MaskedLayer], budget: Budget) -> list[Tensor]:
        """Compact effective weights of each searched layer, differentiable in the scores."""

    @abstractmethod
    def ticket_masks(self, layers: Sequence[MaskedLayer], budget: Budget) -> list[Tensor]:
        """The ticket: a compact boolean mask over each layer's source edges."""

    def fixed_weights(self, layer: MaskedLayer, mask: Tensor) -> Tensor:
        """Effective compact weights of a saved ticket (default: frozen weight * mask)."""
        return layer.weight_src * mask.to(layer.weight_src.dtype)
