"""`slt layers`: every parameter of a config's network and what the search does with it,
laid out on the meta device (shapes only), so it costs nothing whatever the model's size.

Roles: searched (a masked layer the search prunes), frozen (fixed random values from
run.seed: a dense layer, a random bias, a position embedding...), constant (zero biases,
norm scale 1 / shift 0) and learned (trained with the scores: norms under
model.norm = "learned" or model.bn_affine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slt.config.checks import is_reference
from slt.config.schema import Config, DataConfig
from slt.errors import ConfigError
from slt.layers import MaskedLayer, WeightSlot, masked_layers
from slt.models import build_model, other_parameters
from slt.network import count_weights, searched_flags
from slt.source import count_of
from slt.spec import DataSpec

# The data's shape and classes of the built-in datasets, known without reading them.
KNOWN_SPECS = {"mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10),
               "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}


@dataclass(frozen=True)
class ParamRow:
    name: str
    shape: tuple[int, ...]
    role: str  # searched, frozen, constant or learned
    n_source: int | None = None  # source edges, for masked layers
    n_ticket: int | None = None  # edges the ticket keeps (per-layer scope)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def known_spec(data: DataConfig, shape: tuple[int, ...] | None = None,
               classes: int | None = None) -> DataSpec:
    """The data's example shape and class count, without reading it: given, or known for
    the built-in datasets; a ConfigError asking for them otherwise."""
    if data.name == "planted_teacher":
        known: tuple[tuple[int, ...], int] | None = ((data.input_dim,), data.num_classes)
    else:
        known = KNOWN_SPECS.get(data.name)
    if known is None and (shape is None or classes is None):
        raise ConfigError(f"the shape of data.name {data.name!r} is not known without reading "
                          "it: give --input (e.g. 3x224x224) and --classes")
    return DataSpec(shape or known[0], classes or known[1])  # type: ignore[index]


def overview(cfg: Config, spec: DataSpec) -> list[ParamRow]:
    """One row per parameter of the network `build_network(cfg, spec)` builds, in order."""
    count = count_weights(cfg, spec)
    with torch.device("meta"):
        body = build_model(cfg.model, spec)
    names = [name for name, _, _ in count.layers]
    searched = iter(searched_flags(cfg.model, names))
    layer_rows = {}
    for (name, _, n_source), layer in zip(count.layers, masked_layers(body)):
        on = next(searched)
        k = count_of(cfg.keep, n_source) if on and cfg.search.scope == "layer" else None
        layer_rows[name] = ParamRow(name, layer.weight_shape, "searched" if on else "frozen",
                                    n_source, min(k, n_source) if k is not None else None)
    if is_reference(cfg.model.name):
        others = {r.name: ParamRow(r.name, r.shape, r.role)
                  for r in other_parameters(body, cfg.model)}
    else:  # a built-in's only other parameters: BatchNorm's, under model.bn_affine
        others = {n: ParamRow(n, tuple(p.shape), "learned")
                  for n, p in body.named_parameters() if not n.endswith(".scores")}
    rows: list[ParamRow] = []
    for name, module in body.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, MaskedLayer):
            if name in layer_rows:  # not yet listed with its owner (a built-in's layer)
                rows.append(layer_rows.pop(name))
            continue
        # a reference's module: its weight (a slot) first, then its bias and the rest
        rows += [layer_rows.pop(prefix + attr) for attr, child in module._modules.items()
                 if isinstance(child, WeightSlot) and prefix + attr in layer_rows]
        rows += [others[prefix + attr] for attr, p in module._parameters.items()
                 if p is not None and prefix + attr in others]
    return rows


def format_overview(cfg: Config, spec: DataSpec, rows: list[ParamRow]) -> str:
    """The table `slt layers` prints, with totals per role."""
    width = max([len(r.name) for r in rows] + [9])
    lines = [f"model {cfg.model.name}{_kwargs(cfg)} on data of shape {tuple(spec.shape)}, "
             f"{spec.num_classes} classes; source {cfg.source.scheme} at density "
             f"{cfg.source.density:g}, keep {cfg.keep:.4g} ({cfg.search.scope} scope)",
             f"{'parameter':<{width}}  {'shape':<18} {'role':<9} {'numel':>11} "
             f"{'source':>11} {'density':>8} {'ticket':>11}"]
    for r in rows:
        source = "" if r.n_source is None else f"{r.n_source:>11,}"
        dens = "" if r.n_source is None else f"{r.n_source / r.numel:>8.4f}"
        ticket = "" if r.n_ticket is None else f"{r.n_ticket:>11,}"
        lines.append(f"{r.name:<{width}}  {str(list(r.shape)):<18} {r.role:<9} "
                     f"{r.numel:>11,} {source:>11} {dens:>8} {ticket:>11}")
    lines.append("totals:")
    for role in ("searched", "frozen", "constant", "learned"):
        mine = [r for r in rows if r.role == role]
        if mine:
            line = f"  {role:<9} {len(mine):>4} parameters {sum(r.numel for r in mine):>12,}"
            if role == "searched":
                n_source = sum(r.n_source or 0 for r in mine)
                line += (f" weights, {n_source:,} in the source "
                         f"({n_source / sum(r.numel for r in mine):.4f})")
            lines.append(line)
    return "\n".join(lines)


def _kwargs(cfg: Config) -> str:
    if not cfg.model.kwargs:
        return ""
    return " (" + ", ".join(f"{k}={v!r}" for k, v in cfg.model.kwargs) + ")"
