"""IteRand (Chijiwa et al., "Pruning Randomly Initialized Neural Networks with Iterative
Randomization", NeurIPS 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slt.errors import ConfigError
from slt.layers import MaskedLayer
from slt.scorers.base import EpochContext
from slt.scorers.edge_popup import EdgePopup
from slt.scorers.registry import SCORERS
from slt.seeding import generator
from slt.source import INITS


@dataclass(frozen=True)
class IterandOptions:
    every: int = 1  # re-randomise after every this many epochs
    rate: float = 0.1  # probability that a pruned weight is redrawn

    def check(self) -> None:
        if self.every < 1:
            raise ConfigError("search.scorer.every must be >= 1")
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"search.scorer.rate must be in [0, 1], got {self.rate}")


@SCORERS.register("iterand")
class Iterand(EdgePopup):
    """IteRand: edge-popup, plus a periodic partial re-randomisation of the pruned weights.

    Before epoch e (e > 1, (e - 1) % every == 0; the paper's period counts iterations,
    here it counts epochs), each source edge outside the current
    top-k mask is redrawn from the run's weight init with probability `rate`; kept edges
    never change. Draws come from generators seeded by (run seed, layer, epoch); the
    ticket stores the final weights, and checkpoints carry them, so tickets rebuild
    exactly and resumed runs continue from the same weights.
    """

    name = "iterand"
    summary = "edge-popup plus periodic re-randomisation of pruned weights (Chijiwa et al. 2021)"
    Options = IterandOptions
    stores_weights = True

    def on_epoch_start(self, ctx: EpochContext) -> None:
        if ctx.epoch == 1 or (ctx.epoch - 1) % self.options.every or ctx.start_step:
            return  # (a resume inside the epoch: its checkpoint holds the new weights)
        with torch.no_grad():
            masks = self.ticket_masks(ctx.layers, ctx.budget)
            for i, (layer, kept) in enumerate(zip(ctx.layers, masks)):
                rerandomise(layer, kept, self.options.rate,
                            generator("iterand", ctx.seed, i, ctx.epoch))


def rerandomise(layer: MaskedLayer, kept: torch.Tensor, rate: float,
                gen: torch.Generator) -> int:
    """Redraw each pruned edge's weight, with probability `rate`, from the layer's own init
    (same distribution and scale); returns how many were redrawn."""
    name, scale = layer.init_args
    n = layer.n_source
    fresh = INITS.get(name)(layer.weight_shape, layer.fan_in, scale, gen).reshape(-1)
    fresh = fresh[layer.src_idx.cpu()]
    chosen = (torch.rand(n, generator=gen) < rate) & ~kept.cpu()
    w = layer.weight_src
    layer.weight_src = torch.where(chosen.to(w.device), fresh.to(w.device, w.dtype), w)
    return int(chosen.sum())
