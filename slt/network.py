"""Build the searchable network: model -> source mask -> frozen weights -> scores.

`SltNetwork` wraps the architecture and asks the scorer for all effective weights once
per forward pass, because global top-k needs every layer's scores at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from slt.config.checks import is_reference
from slt.config.schema import Config, ModelConfig
from slt.errors import ConfigError, did_you_mean
from slt.layers import MaskedLayer, WeightSlot, masked_layers
from slt.models import build_model, seed_parameters
from slt.plant import Plant, check_plant_scorer, plant_layer, plant_of
from slt.scorers import Budget, Scorer
from slt.scorers.lookup import create_scorer
from slt.seeding import generator
from slt.source import count_of, init_weight, nested_mask, source_counts
from slt.spec import DataSpec


@dataclass(frozen=True)
class LayerInfo:
    index: int
    name: str
    shape: tuple[int, ...]
    numel: int
    searched: bool
    n_source: int


class SltNetwork(nn.Module):
    """The architecture plus the scorer and the ticket budget."""

    def __init__(self, body: nn.Module, scorer: Scorer, budget: Budget, infos: list[LayerInfo],
                 plant: Plant | None = None):
        super().__init__()
        self.body = body
        self.plant = plant  # the teacher written into the weights (plant.enabled), else None
        self.scorer = scorer
        self.budget = budget
        self.infos = infos
        self.fixed = False
        # The layer set is fixed once built: found once here, not on every forward pass.
        self._all_layers = masked_layers(body)
        self._searched_layers = [layer for layer in self._all_layers if layer.searched]
        # a model reference's weights, put back where its own forward reads them
        self._slots = [layer for layer in self._all_layers if isinstance(layer, WeightSlot)]
        # dropout and the like draw from torch's global generator: the loop seeds it per
        # step. A user's model may draw anywhere (stochastic depth, attention dropout), so
        # it always is; a built-in only when it holds a dropout layer.
        self.stochastic = bool(self._slots) or any(_draws_randomly(m) for m in body.modules())

    @property
    def all_layers(self) -> list[MaskedLayer]:
        return self._all_layers

    @property
    def searched_layers(self) -> list[MaskedLayer]:
        return self._searched_layers

    def refresh(self) -> None:
        """Recompute every searched layer's effective weights from the current scores."""
        layers = self.searched_layers
        effective = self.scorer.effective_weights(layers, self.budget, self.training)
        for layer, eff in zip(layers, effective):
            layer.effective_src = eff

    def forward(self, x: Tensor) -> Tensor:
        if not self.fixed:
            self.refresh()
        return self.apply_body(x)

    def apply_body(self, x: Tensor) -> Tensor:
        """The body on `x` with the effective weights as they are (no new top-k): a model
        reference's weights are put back where its forward reads them first."""
        for slot in self._slots:
            slot.install()
        return self.body(x)

    def ticket_masks(self) -> list[Tensor]:
        """Compact boolean ticket mask of each searched layer (over its source edges)."""
        return self.scorer.ticket_masks(self.searched_layers, self.budget)

    def fix_masks(self, masks: Sequence[Tensor]) -> None:
        """Freeze the network on given ticket masks (evaluating a saved ticket)."""
        layers = self.searched_layers
        if len(masks) != len(layers):
            raise ValueError(f"{len(masks)} masks for {len(layers)} searched layers")
        for layer, mask in zip(layers, masks):
            if mask.numel() != layer.n_source:
                raise ValueError("ticket mask does not match the layer's source edges")
            layer.effective_src = self.scorer.fixed_weights(layer, mask.to(layer.weight_src.device))
        self.fixed = True

    def densities(self, masks: Sequence[Tensor] | None = None) -> dict:
        """Source and ticket densities, absolute (of all searched weights) and relative."""
        masks = self.ticket_masks() if masks is None else masks
        searched = [i for i in self.infos if i.searched]
        n_total = sum(i.numel for i in searched)
        n_source = sum(i.n_source for i in searched)
        kept = [int(m.sum()) for m in masks]
        layers = []
        for info, k in zip(searched, kept):
            layers.append({
                "name": info.name, "shape": list(info.shape), "numel": info.numel,
                "n_source": info.n_source, "n_ticket": k,
                "source_density": info.n_source / info.numel,
                "ticket_density": k / info.numel,
                "keep": k / info.n_source if info.n_source else 0.0,
            })
        n_ticket = sum(kept)
        return {
            "n_prunable": n_total, "n_source": n_source, "n_ticket": n_ticket,
            "source_density": n_source / n_total, "ticket_density": n_ticket / n_total,
            "keep": n_ticket / n_source if n_source else 0.0,
            "dense_layers": [i.name for i in self.infos if not i.searched],
            "layers": layers,
        }


def _draws_randomly(module: nn.Module) -> bool:
    """A dropout layer with a non-zero rate."""
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0


def _budget(cfg: Config, source: list[int], sizes: list[int]) -> tuple[Budget, float]:
    """Ticket counts per layer and in total, and the relative keep used for them."""
    n_total, n_source = sum(sizes), sum(source)
    if cfg.search.keep is not None:
        keep = cfg.search.keep
        # A custom list sets its own source density; named schemes hit source.density.
        base = n_source / n_total if cfg.source.scheme == "custom" else cfg.source.density
        ticket_density = keep * base
    else:
        ticket_density = cfg.search.ticket_density  # type: ignore[assignment]
        keep = ticket_density / cfg.source.density
    total_k = min(count_of(ticket_density, n_total), n_source)
    layer_k = tuple(min(n, count_of(keep, n)) for n in source)
    return Budget(cfg.search.scope, layer_k, total_k), keep


def _check_layers(cfg: Config, names: list[str], source: list[int], budget: Budget) -> None:
    """A layer with no source edges (or, per layer, no ticket edges) cuts the network."""
    for name, n_src, k in zip(names, source, budget.layer_k):
        if n_src == 0:
            raise ConfigError(
                f"source.density {cfg.source.density} with scheme {cfg.source.scheme} leaves "
                f"layer {name} with no source edges; raise source.density or pick another scheme"
            )
        if cfg.search.scope == "layer" and k == 0:
            raise ConfigError(
                f"the ticket keeps no edge of layer {name} ({n_src} source edges at keep "
                f"{k / n_src if n_src else 0:.3g}); raise search.keep / search.ticket_density"
            )


def searched_flags(model: ModelConfig, names: Sequence[str]) -> list[bool]:
    """Which of a model's prunable layers (named, in order) the search prunes: all but the
    first and last where `first_layer_dense` / `last_layer_dense` keep them dense, and, of
    those, the ones `search_include` selects (all when empty) and `search_exclude` does
    not. The one place this is decided, for the build, the counts and the layouts."""
    last = len(names) - 1
    include = _matches(model.search_include, names, "search_include")
    exclude = _matches(model.search_exclude, names, "search_exclude")
    return [not ((i == 0 and model.first_layer_dense) or (i == last and model.last_layer_dense))
            and (not model.search_include or include[i]) and not exclude[i]
            for i in range(len(names))]


def _matches(patterns: Sequence[str], names: Sequence[str], key: str) -> list[bool]:
    """Per layer, whether a glob matches its name or the name of a module holding it
    (`blocks.0` selects every layer of the first block); a pattern matching no layer is
    a ConfigError (a typo would otherwise search another network than meant)."""
    scopes = [_scopes(name) for name in names]
    hits = [False] * len(names)
    for pattern in patterns:
        found = [any(fnmatchcase(s, pattern) for s in scope) for scope in scopes]
        if not any(found):
            raise ConfigError(f"model.{key} pattern {pattern!r} matches no layer of the "
                              f"model{did_you_mean(pattern, list(names))} (slt layers lists "
                              "them)")
        hits = [h or f for h, f in zip(hits, found)]
    return hits


def _scopes(name: str) -> list[str]:
    """'a.b.c' -> ['a.b.c', 'a.b', 'a']: the layer and every module holding it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def build_network(cfg: Config, spec: DataSpec) -> SltNetwork:
    """The network of a run on CPU: weights from run.seed, source from source.seed."""
    body = build_model(cfg.model, spec)
    names = {id(m): n for n, m in body.named_modules()}
    layers = masked_layers(body)
    if not layers:
        raise ConfigError(f"model {cfg.model.name} has no prunable layers")
    searched = searched_flags(cfg.model, [names[id(layer)] for layer in layers])
    if not any(searched):
        raise ConfigError("first_layer_dense, last_layer_dense and model.search_include / "
                          "search_exclude leave no layer to search")
    search_layers = [layer for layer, s in zip(layers, searched) if s]
    shapes = [layer.weight_shape for layer in search_layers]
    counts = iter(source_counts(
        cfg.source.scheme, shapes, cfg.source.density, cfg.source.layer_densities
    ))
    src = [next(counts) if s else layer.numel for layer, s in zip(layers, searched)]
    searched_src = [c for c, s in zip(src, searched) if s]
    # check_plant made every layer searched: layer i holds the plant's layer i
    plant = plant_of(cfg, shapes) if cfg.plant.enabled else None
    sized = plant is not None and cfg.plant.size_ticket
    budget, keep = (_plant_budget(cfg, plant, searched_src) if sized else  # type: ignore[arg-type]
                    _budget(cfg, searched_src, [layer.numel for layer in search_layers]))
    _check_layers(cfg, [names[id(layer)] for layer in search_layers], searched_src, budget)

    scorer = create_scorer(cfg.search.scorer, dict(cfg.search.scorer_options))
    if plant is not None:
        check_plant_scorer(scorer)
    scorer.target_keep = keep
    infos, planted = [], []
    for i, (layer, is_searched, n_src) in enumerate(zip(layers, searched, src)):
        forced = (_forced(plant, i, n_src, names[id(layer)])  # type: ignore[arg-type]
                  if cfg.plant.in_source else None)  # in_source: check_plant made a plant
        mask = (nested_mask(layer.weight_shape, n_src, cfg.source.seed, i, forced)
                if is_searched else torch.ones(layer.weight_shape, dtype=torch.bool))
        # a sized ticket's own per-layer density (it need not be keep x the source's)
        ticket = budget.layer_k[i] if sized else keep * n_src
        scale = {"none": 1.0, "source": n_src / layer.numel, "ticket": ticket / layer.numel,
                 }[cfg.model.init_scale] if is_searched else 1.0
        weight = init_weight(cfg.model.init, layer.weight_shape, cfg.run.seed, i, scale)
        if plant is not None:
            planted.append(plant_layer(weight, plant, i))
        layer.init_args = (cfg.model.init, max(scale, 1.0 / layer.numel))
        layer.set_source(weight, mask, is_searched)
        if is_searched:
            scores = scorer.init_scores(layer, generator("scores", cfg.run.seed, i))
            layer.scores = nn.Parameter(scores)
        infos.append(LayerInfo(i, names[id(layer)], layer.weight_shape, layer.numel,
                               is_searched, layer.n_source))
    if plant is not None:
        plant = Plant(plant.positions, tuple(v for v, _ in planted), tuple(c for _, c in planted))
    if is_reference(cfg.model.name):
        seed_parameters(body, cfg.model, cfg.run.seed)
    return SltNetwork(body, scorer, budget, infos, plant)


def _plant_budget(cfg: Config, plant: Plant, source: list[int]) -> tuple[Budget, float]:
    """plant.size_ticket: per layer the plant's edge count (what the source can hold of
    it), in total their sum; the relative keep that amounts to."""
    layer_k = tuple(min(int(p.numel()), n) for p, n in zip(plant.positions, source))
    return Budget(cfg.search.scope, layer_k, sum(layer_k)), sum(layer_k) / sum(source)


def _forced(plant: Plant, index: int, n_source: int, name: str) -> Tensor:
    """The planted edges a source must hold (plant.in_source), when it has room for them."""
    forced = plant.positions[index]
    if forced.numel() > n_source:
        raise ConfigError(f"plant.in_source: layer {name} has {forced.numel()} planted edges "
                          f"but its source holds only {n_source}; raise source.density or "
                          "pick another scheme")
    return forced


@dataclass(frozen=True)
class WeightCount:
    """Sizes of a run's network, known before anything is allocated."""

    layers: tuple[tuple[str, int, int], ...]  # (name, weights, source edges) per prunable layer

    @property
    def n_prunable(self) -> int:
        return sum(n for _, n, _ in self.layers)

    @property
    def n_source(self) -> int:
        return sum(s for _, _, s in self.layers)


def count_weights(cfg: Config, spec: DataSpec, max_parameters: int | None = None
                  ) -> WeightCount:
    """Prunable weights and source edges of every layer `build_network` would build.

    The model is laid out on the meta device (shapes only, no storage), so this is exact
    and costs nothing even at a width that could never be allocated. Per-layer source
    counts come from the same `source_counts` as the build; past 2^53 weights, where float
    rounding makes exact counts meaningless, each searched layer is counted at the density.
    `max_parameters` bounds a model reference's build (a file's arguments).
    """
    with torch.device("meta"):
        body = build_model(cfg.model, spec, max_parameters=max_parameters)
    names = {id(m): n for n, m in body.named_modules()}
    layers = masked_layers(body)
    searched = searched_flags(cfg.model, [names[id(layer)] for layer in layers])
    shapes = [layer.weight_shape for layer, s in zip(layers, searched) if s]
    sizes = [layer.numel for layer, s in zip(layers, searched) if s]
    if cfg.source.scheme == "custom" or sum(sizes) <= 2 ** 53:
        counts = source_counts(cfg.source.scheme, shapes, cfg.source.density,
                               cfg.source.layer_densities)
    else:
        counts = [min(n, count_of(cfg.source.density, n)) for n in sizes]
    it = iter(counts)
    return WeightCount(tuple(
        (names[id(layer)], layer.numel, next(it) if s else layer.numel)
        for layer, s in zip(layers, searched)
    ))
