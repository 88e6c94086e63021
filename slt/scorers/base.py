"""The scoring-rule interface shared by every search method.

A scorer owns these decisions, each a method with a working default where one exists:

- `init_scores`: how a layer's scores start (one per source edge);
- `masks`: the forward mask of every searched layer from the scores and the ticket budget,
  differentiable in the scores (how gradients reach them is the rule's choice: the
  straight-through top-k of `StraightThroughTopK`, a sampled mask, ...);
- `effective_weights`: frozen weights combined with the masks (default: weight * mask);
- `ticket_masks`: the final boolean ticket, exactly at the budget;
- `fixed_weights`: the weights of a saved ticket;
- hooks: `on_epoch_start` (anneal, re-randomise), `regulariser` (a loss term), `after_step`
  (a projection of the scores).

Selection always goes through `slt.topk`, so every rule gets the fast kernel. A rule's
options are a frozen dataclass `Options`, filled from the config's [search.scorer] table.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from slt.layers import MaskedLayer
from slt.topk.op import segmented_topk_mask
from slt.topk.torch_path import segment_offsets


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


@dataclass(frozen=True)
class EpochContext:
    """What a scorer's epoch hook may read: the epoch about to run (1-based), the run's
    length, its seed, the searched layers and the ticket budget. `start_step` > 0 when the
    epoch resumes from a checkpoint taken inside it: what the hook did to the scores or
    weights at the epoch's start is in that checkpoint already, and must not be done again
    (per-epoch settings, such as a generator or an annealed k, are set again as usual)."""

    epoch: int
    epochs: int
    seed: int
    layers: Sequence[MaskedLayer]
    budget: Budget
    start_step: int = 0


class StraightThroughTopK(torch.autograd.Function):
    """Forward: 0/1 top-k mask per segment. Backward: the gradient passes straight through
    to the values, as edge-popup's GetSubnet does."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, offsets: list[int], ks: list[int]) -> Tensor:
        return segmented_topk_mask(values.detach(), offsets, ks).to(values.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


def topk_masks(values: Sequence[Tensor], budget: Budget) -> list[Tensor]:
    """Straight-through 0/1 masks keeping the budget's top values of every layer (or of all
    layers at once in global scope), with one call of `slt.topk` for all layers."""
    sizes = [v.numel() for v in values]
    offsets, ks = budget.segments(sizes)
    flat = StraightThroughTopK.apply(torch.cat(list(values)), offsets, ks)
    return list(flat.split(sizes))


@dataclass(frozen=True)
class NoOptions:
    """A rule without options."""


class Scorer(ABC):
    """Base of every scoring rule; subclasses register in `slt.scorers.SCORERS`.

    Class attributes: `name`; `Options` (a frozen dataclass of the rule's options);
    `stores_weights`, True for rules whose ticket needs the weights written into the file
    (they re-randomise weights, or fold signs into them); the ticket then stores
    `ticket_weights(layer)` for every searched layer; `optimizer`, the search.* settings
    the rule needs to learn at all (e.g. {"lr": 10.0} for a rule whose gradients are
    small), used wherever the user's config file and --set leave them unset. Keys are
    limited to `slt.scorers.lookup.OPTIMIZER_KEYS`; anything else makes the rule unusable.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `slt scorers` (default: the docstring's first)
    Options: ClassVar[type] = NoOptions
    stores_weights: ClassVar[bool] = False
    optimizer: ClassVar[dict[str, Any]] = {}  # search.* settings: user > rule > slt default

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        self.target_keep = 0.5  # fraction of source edges the ticket keeps (set by the network)

    # --- scores and masks --------------------------------------------------------------

    def init_scores(self, layer: MaskedLayer, gen: torch.Generator) -> Tensor:
        """Compact scores, one per source edge: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which is
        what edge-popup's kaiming_uniform(a=sqrt(5)) gives. Drawn for every edge of the
        layer and then gathered, so an edge starts from the same score in every source."""
        bound = 1.0 / math.sqrt(layer.fan_in)
        dense = (torch.rand(layer.numel, generator=gen) * 2 - 1) * bound
        return dense[layer.src_idx.cpu()]

    @abstractmethod
    def masks(self, layers: Sequence[MaskedLayer], budget: Budget, training: bool
              ) -> list[Tensor]:
        """Forward mask of each searched layer (compact, float, differentiable in the
        scores); `training` is False when the network is evaluated."""

    def effective_weights(self, layers: Sequence[MaskedLayer], budget: Budget,
                          training: bool = True) -> list[Tensor]:
        """Compact effective weights of each searched layer (default: weight * mask)."""
        masks = self.masks(layers, budget, training)
        return [layer.weight_src * m for layer, m in zip(layers, masks)]

    def ticket_masks(self, layers: Sequence[MaskedLayer], budget: Budget) -> list[Tensor]:
        """The ticket: a compact boolean mask over each layer's source edges (default: the
        evaluation mask's nonzero entries)."""
        with torch.no_grad():
            return [m != 0 for m in self.masks(layers, budget, training=False)]

    def fixed_weights(self, layer: MaskedLayer, mask: Tensor) -> Tensor:
        """Effective compact weights of a saved ticket (default: frozen weight * mask)."""
        return layer.weight_src * mask.to(layer.weight_src.dtype)

    def ticket_weights(self, layer: MaskedLayer) -> Tensor:
        """The compact weights a `stores_weights` rule writes into its ticket."""
        return layer.weight_src

    # --- hooks ---------------------------------------------------------------------------

    def on_epoch_start(self, ctx: EpochContext) -> None:  # noqa: B027 (optional hook)
        """Called before every epoch that runs. A resumed run calls it only for the epochs
        still to run, so schedules must be pure functions of the epoch; weights a rule
        changes come back from the checkpoint (`stores_weights`)."""

    def regulariser(self, layers: Sequence[MaskedLayer]) -> Tensor | None:
        """A term added to the training loss, or None."""
        return None

    def after_step(self, layers: Sequence[MaskedLayer]) -> None:  # noqa: B027 (optional hook)
        """Called after every optimiser step (e.g. to project scores onto a range)."""

    def state(self) -> dict[str, Any]:
        """What the rule has drawn or counted within the current epoch (a generator's state,
        say), for a checkpoint inside an epoch; `on_epoch_start` rebuilds the rest."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore `state()` after `on_epoch_start` of the epoch it was taken in."""


def options_of(cls: type[Scorer], given: dict[str, Any], coerce: Any) -> Any:
    """The rule's Options from a [search.scorer] table; unknown names are config errors."""
    from slt.errors import ConfigError, did_you_mean

    known = {f.name: f for f in dataclasses.fields(cls.Options)}
    for key in given:
        if key not in known:
            options = ", ".join(known) or "none"
            raise ConfigError(f"unknown option search.scorer.{key} for scorer '{cls.name}'"
                              f"{did_you_mean(key, list(known))}; its options: {options}")
    hints = __import__("typing").get_type_hints(cls.Options)
    values = {k: coerce(f"search.scorer.{k}", v, hints[k]) for k, v in given.items()}
    for k, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"search.scorer.{k} must be a finite number, got {v}")
    opts = cls.Options(**values)
    check = getattr(opts, "check", None)
    if check is not None:
        check()
    return opts
