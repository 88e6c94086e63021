"""Bernoulli supermask (Zhou et al., "Deconstructing Lottery Tickets: Zeros, Signs, and the
Supermask", NeurIPS 2019)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from slt.layers import MaskedLayer
from slt.scorers.base import Budget, EpochContext, Scorer, topk_masks
from slt.scorers.registry import SCORERS
from slt.seeding import derive_seed


@SCORERS.register("bernoulli")
class Bernoulli(Scorer):
    """Bernoulli supermask: in training each edge is kept with probability sigmoid(s),
    sampled afresh every forward pass, the gradient passing straight through the sample to
    sigmoid(s); in evaluation (and in the ticket) the mask is deterministic.

    train: m ~ Bernoulli(sigmoid(s)), dL/ds = dL/dm * sigmoid'(s); eval: m = top_k(s).
    Zhou et al. threshold at sigmoid(s) > 0.5 with a free density; here the threshold is
    the k-th largest score, so the ticket has exactly the run's budget and rules compare
    at one density. Scores start at logit(keep) plus the usual small uniform noise, so the
    expected training density starts at the target (weight decay on the scores pulls it
    towards 1/2 over the run; set search.weight_decay = 0 to avoid that). Samples come
    from a generator seeded by (run seed, epoch), so a resumed run draws what an
    uninterrupted one draws. The gradient through sigmoid is small, and Zhou et al. train
    supermasks with a large learning rate (SGD, lr 100): with slt's default lr 0.1 the
    scores barely move (MNIST stays at chance); search.lr = 30 reached 83% in 2 epochs.
    """

    name = "bernoulli"
    summary = ("mask sampled from sigmoid(scores) in training, top-k in evaluation "
               "(Zhou et al. 2019)")

    def __init__(self, options: object = None) -> None:
        super().__init__(options)
        self.gen: torch.Generator | None = None

    def init_scores(self, layer: MaskedLayer, gen: torch.Generator) -> Tensor:
        return super().init_scores(layer, gen) + _logit(self.target_keep)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        device = ctx.layers[0].scores.device
        self.gen = torch.Generator(device=device).manual_seed(
            derive_seed("bernoulli", ctx.seed, ctx.epoch))

    def masks(self, layers: Sequence[MaskedLayer], budget: Budget, training: bool
              ) -> list[Tensor]:
        if not training:
            return topk_masks([layer.scores for layer in layers], budget)
        out = []
        for layer in layers:
            p = torch.sigmoid(layer.scores)
            u = torch.rand(p.shape, generator=self.gen, device=p.device, dtype=p.dtype)
            sample = (u < p).to(p.dtype)
            out.append(p + (sample - p).detach())  # value: the sample; gradient: d sigmoid
        return out


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))
