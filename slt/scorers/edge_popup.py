"""edge-popup (Ramanujan et al., "What's Hidden in a Randomly Weighted Neural Network?",
CVPR 2020): keep the top-k source edges by |score|; the gradient reaches the scores
straight through the mask (and through |.|, as in the reference code)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from slt.layers import MaskedLayer
from slt.scorers.base import Budget, Scorer, StraightThroughTopK
from slt.scorers.registry import SCORERS


def _flat_abs(layers: Sequence[MaskedLayer]) -> Tensor:
    return torch.cat([layer.scores.abs() for layer in layers])


@SCORERS.register("edge-popup")
class EdgePopup(Scorer):
    name = "edge-popup"

    def _masks(self, layers: Sequence[MaskedLayer], budget: Budget) -> list[Tensor]:
        sizes = [layer.n_source for layer in layers]
        offsets, ks = budget.segments(sizes)
        flat = StraightThroughTopK.apply(_flat_abs(layers), offsets, ks)
        return list(flat.split(sizes))

    def effective_weights(self, layers: Sequence[MaskedLayer], budget: Budget) -> list[Tensor]:
        masks = self._masks(layers, budget)
        return [layer.weight_src * m for layer, m in zip(layers, masks)]

    def ticket_masks(self, layers: Sequence[MaskedLayer], budget: Budget) -> list[Tensor]:
        with torch.no_grad():
            return [m.bool() for m in self._masks(layers, budget)]
