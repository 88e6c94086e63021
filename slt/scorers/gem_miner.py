"""GEM-Miner (Sreenivasan et al., "Rare Gems: Finding Lottery Tickets at Initialization",
NeurIPS 2022)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from slt.errors import ConfigError
from slt.layers import MaskedLayer
from slt.scorers.base import Budget, EpochContext, Scorer, topk_masks
from slt.scorers.registry import SCORERS


@dataclass(frozen=True)
class GemOptions:
    lam: float = 1e-5  # regulariser strength: lam * sum of all scores
    prune_every: int = 2  # hard-prune to the target after every this many epochs (0: never)

    def check(self) -> None:
        if self.lam < 0:
            raise ConfigError(f"search.scorer.lam must be >= 0, got {self.lam}")
        if self.prune_every < 0:
            raise ConfigError("search.scorer.prune_every must be >= 0")


class _Round(torch.autograd.Function):
    """1[s >= 0.5] forward, identity backward (straight-through rounding)."""

    @staticmethod
    def forward(ctx: object, s: Tensor) -> Tensor:
        return (s >= 0.5).to(s.dtype)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad


@SCORERS.register("gem-miner")
class GemMiner(Scorer):
    """GEM-Miner: scores in [0, 1] (projected after every step), training mask
    m = 1[s >= 0.5] straight through, a sparsity regulariser lam * sum(s) (scores are
    non-negative, so this is their L1 norm), and a hard prune every `prune_every` epochs
    that zeroes the scores of all edges outside the top-k of the budget.

    Evaluation and the ticket use the top-k scores: exactly the run's budget. Scores start
    U(0, 1), drawn for every edge and gathered like edge-popup's. Simplifications: the
    training density is steered only by the regulariser and the hard prunes (it starts
    near 1/2); a hard prune jumps straight to the target; BatchNorm statistics are
    gathered under the training mask; scores clamped to equal values tie, and the top-k
    then keeps the lower index.
    """

    name = "gem-miner"
    summary = ("scores in [0, 1], threshold mask, L1 regulariser, periodic hard pruning "
               "(Sreenivasan et al. 2022)")
    Options = GemOptions

    def init_scores(self, layer: MaskedLayer, gen: torch.Generator) -> Tensor:
        return torch.rand(layer.numel, generator=gen)[layer.src_idx.cpu()]

    def masks(self, layers: Sequence[MaskedLayer], budget: Budget, training: bool
              ) -> list[Tensor]:
        if not training:
            return topk_masks([layer.scores for layer in layers], budget)
        return [_Round.apply(layer.scores) for layer in layers]

    def regulariser(self, layers: Sequence[MaskedLayer]) -> Tensor | None:
        if self.options.lam == 0:
            return None
        return self.options.lam * sum(layer.scores.sum() for layer in layers)

    def after_step(self, layers: Sequence[MaskedLayer]) -> None:
        with torch.no_grad():
            for layer in layers:
                layer.scores.clamp_(0.0, 1.0)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        every = self.options.prune_every
        if every and ctx.epoch > 1 and (ctx.epoch - 1) % every == 0 and not ctx.start_step:
            hard_prune(ctx.layers, ctx.budget)


def hard_prune(layers: Sequence[MaskedLayer], budget: Budget) -> None:
    """Zero the scores of every edge outside the budget's top-k."""
    with torch.no_grad():
        keep = topk_masks([layer.scores.detach() for layer in layers], budget)
        for layer, k in zip(layers, keep):
            layer.scores.mul_(k)
