"""biprop (Diffenderfer & Kailkhura, "Multi-Prize Lottery Ticket Hypothesis", ICLR 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from slt.layers import MaskedLayer
from slt.scorers.base import Budget, Scorer, topk_masks
from slt.scorers.registry import SCORERS


def gain(weight: Tensor, mask: Tensor) -> Tensor:
    """alpha = mean |w| over the kept edges (0 when none is kept)."""
    kept = mask.detach().abs()
    return (weight.abs() * kept).sum() / kept.sum().clamp_min(1.0)


@SCORERS.register("biprop")
class Biprop(Scorer):
    """biprop: binary weights sign(w) * alpha on the top-k edges by |score|, with one gain
    per layer alpha = sum(|w| * m) / sum(m), the mean |w| over kept edges.

    m = top_k(|s|) straight through; w_eff = alpha * sign(w) * m, so the scores receive
    dL/ds = dL/dw_eff * alpha * sign(w) * sign(s), with alpha held constant in the
    backward pass. The authors' code routes the gradient differently (per-edge weight
    magnitudes); slt uses the plain chain rule through the expression above.
    """

    name = "biprop"
    summary = "binary weights sign(w) * alpha on the top-k edges (Diffenderfer & Kailkhura 2021)"

    def masks(self, layers: Sequence[MaskedLayer], budget: Budget, training: bool
              ) -> list[Tensor]:
        return topk_masks([layer.scores.abs() for layer in layers], budget)

    def effective_weights(self, layers: Sequence[MaskedLayer], budget: Budget,
                          training: bool = True) -> list[Tensor]:
        out = []
        for layer, m in zip(layers, self.masks(layers, budget, training)):
            w = layer.weight_src
            out.append(gain(w, m) * torch.sign(w) * m)
        return out

    def fixed_weights(self, layer: MaskedLayer, mask: Tensor) -> Tensor:
        m = mask.to(layer.weight_src.dtype)
        return gain(layer.weight_src, m) * torch.sign(layer.weight_src) * m
