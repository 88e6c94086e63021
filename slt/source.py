"""Random sparse source networks: layerwise schemes, nested ER masks, weight init.

Each edge gets one random priority (a random permutation per layer, from the source seed);
the source at density d keeps the edges whose priority ranks in the top `count_l` of their
layer. So for one seed the source at d=0.2 is a subset of the one at d=0.5, and weights
(drawn from their own seed stream) are the same at every density.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from slt.errors import ConfigError
from slt.registry import Registry
from slt.seeding import generator

Shape = tuple[int, ...]
SchemeFn = Callable[[Sequence[Shape], float], list[float]]
InitFn = Callable[[Shape, int, float, torch.Generator], Tensor]

SCHEMES: Registry[SchemeFn] = Registry("layerwise scheme")
INITS: Registry[InitFn] = Registry("weight init")


# --- layerwise schemes ---------------------------------------------------------------------


def _fan_dims(shape: Shape) -> tuple[int, int]:
    """(n_in, n_out) of a Linear (out, in) or Conv (out, in, kh, kw) weight."""
    return shape[1], shape[0]


def scale_to_density(factors: Sequence[float], sizes: Sequence[int], density: float) -> list[float]:
    """d_l = min(1, eps * factor_l) with eps chosen so sum d_l n_l = density * N.

    Layers clipped at 1 give their surplus to the others (as RigL's ERK does).
    """
    total = density * sum(sizes)
    dense: set[int] = set()
    while True:
        budget = total - sum(sizes[i] for i in dense)
        denom = sum(f * n for i, (f, n) in enumerate(zip(factors, sizes)) if i not in dense)
        if denom <= 0:
            return [1.0] * len(sizes)
        eps = budget / denom
        over = {i for i, f in enumerate(factors) if i not in dense and eps * f > 1.0}
        if not over:
            return [1.0 if i in dense else eps * f for i, f in enumerate(factors)]
        dense |= over


@SCHEMES.register("uniform")
def uniform(shapes: Sequence[Shape], density: float) -> list[float]:
    """Every layer at the same density."""
    return [density] * len(shapes)


@SCHEMES.register("er")
def erdos_renyi(shapes: Sequence[Shape], density: float) -> list[float]:
    """d_l proportional to (n_in + n_out) / (n_in * n_out) (Mocanu et al. 2018)."""
    factors = [(a + b) / (a * b) for a, b in map(_fan_dims, shapes)]
    return scale_to_density(factors, [math.prod(s) for s in shapes], density)


@SCHEMES.register("erk")
def erdos_renyi_kernel(shapes: Sequence[Shape], density: float) -> list[float]:
    """d_l proportional to sum(dims) / prod(dims), kernel dims included (Evci et al. 2020)."""
    factors = [sum(s) / math.prod(s) for s in shapes]
    return scale_to_density(factors, [math.prod(s) for s in shapes], density)


@SCHEMES.register("balanced")
def balanced(shapes: Sequence[Shape], density: float) -> list[float]:
    """Every layer gets the same number of edges (clipped at its size)."""
    sizes = [math.prod(s) for s in shapes]
    return scale_to_density([1.0 / n for n in sizes], sizes, density)


@SCHEMES.register("pyramidal")
def pyramidal(shapes: Sequence[Shape], density: float) -> list[float]:
    """d_l = r^l (l = 1..L) with r solving sum n_l r^l = d N, by bisection."""
    sizes = [math.prod(s) for s in shapes]
    target = density * sum(sizes)

    def edges(r: float) -> float:
        return sum(n * r ** (i + 1) for i, n in enumerate(sizes))

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if edges(mid) < target:
            lo = mid
        else:
            hi = mid
    r = hi
    return [min(1.0, r ** (i + 1)) for i in range(len(sizes))]


def layer_densities(
    scheme: str, shapes: Sequence[Shape], density: float, custom: Sequence[float] = ()
) -> list[float]:
    """Real-valued per-layer densities of a scheme (custom: the user's list)."""
    if scheme == "custom":
        if len(custom) != len(shapes):
            raise ConfigError(
                f"source.layer_densities has {len(custom)} entries but the model has "
                f"{len(shapes)} searched layers"
            )
        return list(custom)
    return SCHEMES.get(scheme)(shapes, density)


def allocate_counts(sizes: Sequence[int], densities: Sequence[float], total: int) -> list[int]:
    """Integer edge counts near d_l * n_l that add up to exactly `total`.

    Floors first, then the remaining edges go to the largest fractional parts (lower layer
    index first on ties), never past a layer's size.
    """
    targets = [min(1.0, max(0.0, d)) * n for d, n in zip(densities, sizes)]
    counts = [min(n, math.floor(t + 1e-9)) for t, n in zip(targets, sizes)]
    left = total - sum(counts)
    order = sorted(range(len(sizes)), key=lambda i: (-(targets[i] - counts[i]), i))
    while left > 0:
        progressed = False
        for i in order:
            if left == 0:
                break
            if counts[i] < sizes[i]:
                counts[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"cannot place {total} edges in layers of sizes {list(sizes)}")
    while left < 0:  # only when rounding of `total` fell below the floors
        for i in reversed(order):
            if left == 0:
                break
            if counts[i] > 0:
                counts[i] -= 1
                left += 1
    return counts


def source_counts(
    scheme: str, shapes: Sequence[Shape], density: float, custom: Sequence[float] = ()
) -> list[int]:
    """Exact number of source edges per layer; totals round(d * N) except for custom lists."""
    sizes = [math.prod(s) for s in shapes]
    dens = layer_densities(scheme, shapes, density, custom)
    if scheme == "custom":
        return [min(n, round(d * n)) for d, n in zip(dens, sizes)]
    return allocate_counts(sizes, dens, round(density * sum(sizes)))


def nested_mask(shape: Shape, count: int, source_seed: int, layer_index: int) -> Tensor:
    """Boolean mask holding the `count` highest-priority edges of a layer.

    The priority order is a random permutation fixed by (source seed, layer index), so a
    smaller count always gives a subset of a larger one.
    """
    numel = math.prod(shape)
    order = torch.randperm(numel, generator=generator("source", source_seed, layer_index))
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[order[:count]] = True
    return mask.view(shape)


# --- weight init ---------------------------------------------------------------------------


@INITS.register("kaiming_normal")
def kaiming_normal(shape: Shape, fan_in: int, density: float, gen: torch.Generator) -> Tensor:
    """N(0, 2 / (fan_in * density)): He init (ReLU gain), std scaled up for sparse layers."""
    std = math.sqrt(2.0 / fan_in) / math.sqrt(density)
    return torch.randn(shape, generator=gen) * std


@INITS.register("signed_constant")
def signed_constant(shape: Shape, fan_in: int, density: float, gen: torch.Generator) -> Tensor:
    """+-sqrt(2 / (fan_in * density)) with random signs (edge-popup's best init)."""
    std = math.sqrt(2.0 / fan_in) / math.sqrt(density)
    signs = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
    return signs * std


def init_weight(
    init: str, shape: Shape, run_seed: int, layer_index: int, scale_density: float = 1.0
) -> Tensor:
    """Frozen random weights of one layer: depend on the run seed only (and the scale)."""
    fan_in = math.prod(shape) // shape[0]
    density = max(scale_density, 1.0 / math.prod(shape))
    return INITS.get(init)(shape, fan_in, density, generator("weights", run_seed, layer_index))
