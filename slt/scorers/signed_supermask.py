"""Signed supermask (Koster et al., "Signing the Supermask: Keep, Hide, Invert", ICLR 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from slt.layers import MaskedLayer
from slt.scorers.base import Budget, Scorer, topk_masks
from slt.scorers.registry import SCORERS


@SCORERS.register("signed-supermask")
class SignedSupermask(Scorer):
    """Signed supermask: mask values in {-1, 0, 1}. The k edges of largest |score| are
    kept with the sign of their score (keep, or invert the weight); the rest are hidden.

    m = sign(s) * top_k(|s|), straight through to s; w_eff = w * m. The ticket stores
    w * sign(s) as its weights, so it rebuilds with the inversions.
    """

    name = "signed-supermask"
    summary = "mask values in {-1, 0, 1}: keep, hide or invert an edge (Koster et al. 2022)"
    stores_weights = True

    def masks(self, layers: Sequence[MaskedLayer], budget: Budget, training: bool
              ) -> list[Tensor]:
        keep = topk_masks([layer.scores.abs() for layer in layers], budget)
        # sign(s) passes gradient straight through as well: d m / d s = 1 on kept edges
        signs = [_ste_sign(layer.scores) for layer in layers]
        return [k * s for k, s in zip(keep, signs)]

    def ticket_weights(self, layer: MaskedLayer) -> Tensor:
        return layer.weight_src * _sign(layer.scores.detach())


def _sign(x: Tensor) -> Tensor:
    """sign with sign(0) = +1, so a kept edge is never zeroed by its sign."""
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)


def _ste_sign(x: Tensor) -> Tensor:
    return x + (_sign(x) - x).detach()
