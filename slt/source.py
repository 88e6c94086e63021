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
Curve = Callable[[float], list[float]]
SchemeFn = Callable[[Sequence[Shape]], Curve]
InitFn = Callable[[Shape, int, float, torch.Generator], Tensor]

SCHEMES: Registry[SchemeFn] = Registry("layerwise scheme")
INITS: Registry[InitFn] = Registry("weight init")


# --- layerwise schemes ---------------------------------------------------------------------
#
# A scheme is a monotone curve: t in [0, 1] -> per-layer densities, all 0 at t=0 and all 1 at
# t=1. The source with T edges in total takes the smallest t whose rounded per-layer counts
# reach T. Because one curve serves every density, a layer's count never falls as the
# density rises, so sources nest, and totals are exact.


def count_of(fraction: float, n: int) -> int:
    """round(fraction * n) with halves rounded up (Python's round() rounds halves to even)."""
    return int(math.floor(fraction * n + 0.5))


def _fan_dims(shape: Shape) -> tuple[int, int]:
    """(n_in, n_out) of a Linear (out, in) or Conv (out, in, kh, kw) weight."""
    return shape[1], shape[0]


def _scaled(factors: Sequence[float]) -> Curve:
    """d_l = min(1, eps * factor_l): layers clipped at 1 hand their surplus to the others
    (as RigL's ERK does); t scales eps so that t = 1 makes every layer dense."""
    top = 1.0 / min(factors)
    return lambda t: [min(1.0, t * top * f) for f in factors]


@SCHEMES.register("uniform")
def uniform(shapes: Sequence[Shape]) -> Curve:
    """Every layer at the same density."""
    return lambda t: [t] * len(shapes)


@SCHEMES.register("er")
def erdos_renyi(shapes: Sequence[Shape]) -> Curve:
    """d_l proportional to (n_in + n_out) / (n_in * n_out) (Mocanu et al. 2018)."""
    return _scaled([(a + b) / (a * b) for a, b in map(_fan_dims, shapes)])


@SCHEMES.register("erk")
def erdos_renyi_kernel(shapes: Sequence[Shape]) -> Curve:
    """d_l proportional to sum(dims) / prod(dims), kernel dims included (Evci et al. 2020)."""
    return _scaled([sum(s) / math.prod(s) for s in shapes])


@SCHEMES.register("balanced")
def balanced(shapes: Sequence[Shape]) -> Curve:
    """Every layer gets the same number of edges (clipped at its size)."""
    return _scaled([1.0 / math.prod(s) for s in shapes])


@SCHEMES.register("pyramidal")
def pyramidal(shapes: Sequence[Shape]) -> Curve:
    """d_l = r^l (l = 1..L); r is found by the count search, so sum n_l r^l = d N."""
    return lambda t: [t ** (i + 1) for i in range(len(shapes))]


def _counts_at(curve: Curve, sizes: Sequence[int], t: float) -> list[int]:
    return [min(n, count_of(d, n)) for d, n in zip(curve(t), sizes)]


def allocate(curve: Curve, sizes: Sequence[int], total: int) -> list[int]:
    """Per-layer counts on the curve that add up to exactly `total`.

    Bisection finds the t where the rounded counts step past `total`; the layers that step
    there are filled in layer order. Counts are monotone in `total` (nesting).
    """
    if not 0 <= total <= sum(sizes):
        raise ValueError(f"cannot place {total} edges in layers of sizes {list(sizes)}")
    lo, hi = 0.0, 1.0
    if sum(_counts_at(curve, sizes, hi)) < total:  # pragma: no cover - curves end dense
        raise ValueError("scheme curve does not reach a dense network at t = 1")
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(_counts_at(curve, sizes, mid)) >= total:
            hi = mid
        else:
            lo = mid
    counts = _counts_at(curve, sizes, lo)
    upper = _counts_at(curve, sizes, hi)
    left = total - sum(counts)
    for i in range(len(sizes)):
        step = min(left, upper[i] - counts[i])
        counts[i] += step
        left -= step
    assert left == 0
    return counts


def source_counts(
    scheme: str, shapes: Sequence[Shape], density: float, custom: Sequence[float] = ()
) -> list[int]:
    """Exact number of source edges per layer; totals round(d * N) except for custom lists."""
    sizes = [math.prod(s) for s in shapes]
    if scheme == "custom":
        if len(custom) != len(shapes):
            raise ConfigError(
                f"source.layer_densities has {len(custom)} entries but the model has "
                f"{len(shapes)} searched layers"
            )
        return [min(n, count_of(d, n)) for d, n in zip(custom, sizes)]
    return allocate(SCHEMES.get(scheme)(shapes), sizes, count_of(density, sum(sizes)))


def layer_densities(
    scheme: str, shapes: Sequence[Shape], density: float, custom: Sequence[float] = ()
) -> list[float]:
    """Per-layer source densities d_l as built (edge counts over layer sizes)."""
    counts = source_counts(scheme, shapes, density, custom)
    return [c / math.prod(s) for c, s in zip(counts, shapes)]


def nested_mask(shape: Shape, count: int, source_seed: int, layer_index: int,
                forced: Tensor | None = None) -> Tensor:
    """Boolean mask holding the `count` highest-priority edges of a layer.

    The priority order is a random permutation fixed by (source seed, layer index), so a
    smaller count always gives a subset of a larger one. `forced` flat positions (a plant
    held in the source) go first in that order, so sources stay nested and exact in count.
    """
    numel = math.prod(shape)
    order = torch.randperm(numel, generator=generator("source", source_seed, layer_index))
    if forced is not None and forced.numel():
        order = torch.cat([forced, order[~torch.isin(order, forced)]])
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
