"""edge-popup (Ramanujan et al., "What's Hidden in a Randomly Weighted Neural Network?",
CVPR 2020), and its global form with an annealed ticket density."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from slt.errors import ConfigError
from slt.layers import MaskedLayer
from slt.scorers.base import Budget, EpochContext, Scorer, topk_masks
from slt.scorers.registry import SCORERS
from slt.source import count_of


@SCORERS.register("edge-popup")
class EdgePopup(Scorer):
    """edge-popup: keep the top-k source edges by |score|, per layer or global (search.scope).

    m = top_k(|s|); w_eff = w * m; dL/ds = dL/dm * sign(s) (straight through the top-k,
    then through |.|, as in the reference code).
    """

    name = "edge-popup"
    summary = "top-k edges by |score|, straight-through (Ramanujan et al. 2020)"

    def masks(self, layers: Sequence[MaskedLayer], budget: Budget, training: bool
              ) -> list[Tensor]:
        return topk_masks([layer.scores.abs() for layer in layers], self.budget(budget))

    def budget(self, budget: Budget) -> Budget:
        """The budget in force now (the run's, unless a subclass anneals it)."""
        return budget


@dataclass(frozen=True)
class AnnealOptions:
    anneal_epochs: int = 5  # epochs over which the ticket density falls to the target

    def check(self) -> None:
        if self.anneal_epochs < 0:
            raise ConfigError("search.scorer.anneal_epochs must be >= 0")


@SCORERS.register("global-edge-popup")
class GlobalEdgePopup(EdgePopup):
    """Global edge-popup whose ticket density anneals from the source density down to the
    target with a cubic schedule over the first `anneal_epochs` epochs, against layer
    collapse at high sparsity (the schedule of gradual pruning, Zhu & Gupta 2017, as used
    for global strong tickets).

    k(e) = k_T + (n_S - k_T) * (1 - min(1, (e - 1) / E))^3 over all layers at once, where
    n_S is the number of source edges, k_T the target and E = anneal_epochs (at most the
    run's epochs - 1); epochs e >= E + 1 and the ticket use exactly k_T. The rule is
    global whatever search.scope says; while it anneals, the per-epoch test accuracy is
    that of the denser mask in force.
    """

    name = "global-edge-popup"
    summary = ("global top-k, ticket density annealed from the source density to the "
               "target (cubic)")
    Options = AnnealOptions

    def __init__(self, options: AnnealOptions | None = None) -> None:
        super().__init__(options)
        self.total_k: int | None = None

    def on_epoch_start(self, ctx: EpochContext) -> None:
        # the last epoch always runs at the target, so the run's final accuracy is the ticket's
        span = min(self.options.anneal_epochs, ctx.epochs - 1)
        self.total_k = annealed_k(ctx.epoch, span,
                                  sum(layer.n_source for layer in ctx.layers),
                                  ctx.budget.total_k)

    def budget(self, budget: Budget) -> Budget:
        k = budget.total_k if self.total_k is None else self.total_k
        return Budget("global", budget.layer_k, k)

    def ticket_masks(self, layers: Sequence[MaskedLayer], budget: Budget) -> list[Tensor]:
        target = Budget("global", budget.layer_k, budget.total_k)  # always the target
        with torch.no_grad():
            return [m != 0 for m in topk_masks([la.scores.abs() for la in layers], target)]


def annealed_k(epoch: int, anneal_epochs: int, n_source: int, target: int) -> int:
    """Edges kept in `epoch` (1-based) under the cubic schedule from n_source to target."""
    if anneal_epochs <= 0 or epoch > anneal_epochs:
        return target
    frac = (1.0 - (epoch - 1) / anneal_epochs) ** 3
    return target + count_of(frac, n_source - target)
