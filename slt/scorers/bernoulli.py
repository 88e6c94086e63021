"""Bernoulli supermask (Zhou et al., "Deconstructing Lottery Tickets: Zeros, Signs, and the
Supermask", NeurIPS 2019)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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
    expected training density starts at the target. Samples come from a generator seeded
    by (run seed, epoch), so a resumed run draws what an uninterrupted one draws.

    Optimizer (declared in `optimizer`, used where the user's config leaves a key unset):
    the gradient through sigmoid is small, and Zhou et al. train supermasks with a large
    learning rate (SGD, lr 100), so the rule declares lr 10; weight decay on the scores
    pulls them towards 0 (sigmoid 1/2, not the target density), which a large lr makes
    strong, so it declares weight_decay 0. Measured on MNIST, LeNet-300-100, one epoch,
    source density 0.5, ticket density 0.25, test accuracy (seeds 0 / 1): lr 0.1 (slt's
    default) 30%; weight_decay 0: lr 1 47%, 3 69%, 10 84% / 82%, 30 78% / 74%, 100 66%;
    weight_decay 1e-4 (mnist_lenet.toml sets it, so there it replaces the rule's 0): lr 10
    72% / 73%, 30 74% / 74%; weight_decay 5e-4 (slt's default): lr 10 42%. Over longer
    runs the test accuracy (top-k mask) falls while the sampled training accuracy rises
    (lr 10, weight_decay 0, 3 epochs: test 81%, 76%, 75%; train 75%, 88%, 89%).
    """

    name = "bernoulli"
    summary = ("mask sampled from sigmoid(scores) in training, top-k in evaluation "
               "(Zhou et al. 2019)")
    optimizer = {"lr": 10.0, "weight_decay": 0.0}  # measured: see the docstring

    def __init__(self, options: object = None) -> None:
        super().__init__(options)
        self.gen: torch.Generator | None = None

    def init_scores(self, layer: MaskedLayer, gen: torch.Generator) -> Tensor:
        return super().init_scores(layer, gen) + _logit(self.target_keep)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        device = ctx.layers[0].scores.device
        self.gen = torch.Generator(device=device).manual_seed(
            derive_seed("bernoulli", ctx.seed, ctx.epoch))

    def state(self) -> dict[str, Any]:
        """The sampler's position within the epoch: a resume inside it draws what an
        uninterrupted run draws."""
        return {} if self.gen is None else {"generator": self.gen.get_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        if self.gen is not None and "generator" in state:
            self.gen.set_state(state["generator"].cpu())

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
