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

    m = sign(s) * top_k(|s|), with one straight-through estimator (dm/ds = 1 on every
    edge); w_eff = w * m. The ticket stores w * sign(s) as its weights, so it rebuilds
    with the inversions. Koster et al. also change the activation (ELUS); slt keeps the
    architecture's own.
    """

    name = "signed-supermask"
    summary = "mask values in {-1, 0, 1}: keep, hide or invert an edge (Koster et al. 2022)"
    stores_weights = True

    def masks(self, layers: Sequence[MaskedLayer], budget: Budget, training: bool
              ) -> list[Tensor]:
        with torch.no_grad():
            keep = topk_masks([layer.scores.abs() for layer in layers], budget)
        # value sign(s) * keep, gradient straight through to s (dm/ds = 1)
        return [layer.scores + (_sign(layer.scores.detach()) * k - layer.scores).detach()
                for layer, k in zip(layers, keep)]

    def ticket_weights(self, layer: MaskedLayer) -> Tensor:
        return layer.weight_src * _sign(layer.scores.detach())


def _sign(x: Tensor) -> Tensor:
    """sign with sign(0) = +1, so a kept edge is never zeroed by its sign."""
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)
