"""Pure computations behind the report: ticket overlap and survival on masks, statistics
over seeds, the width the theory asks of a sparse source. Kept apart from file reading so
each is tested on hand-made inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from slt.errors import ConfigError

if TYPE_CHECKING:  # `slt sweep status` reads runs without importing torch
    from torch import Tensor

THEORY = "theory"


def _pairs(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError("mask lists must have one mask per layer, of equal shapes")
    return [(x.bool(), y.bool()) for x, y in zip(a, b)]


def jaccard(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """|A ∩ B| / |A ∪ B| over all layers' masks together (1.0 when both are empty)."""
    inter = union = 0
    for x, y in _pairs(a, b):
        inter += int((x & y).sum())
        union += int((x | y).sum())
    return inter / union if union else 1.0


def surviving(ticket: Sequence[Tensor], source: Sequence[Tensor]) -> list[Tensor]:
    """The part of a ticket still present in (another, sparser) source."""
    return [t & s for t, s in _pairs(ticket, source)]


def surviving_fraction(ticket: Sequence[Tensor], source: Sequence[Tensor]) -> float:
    """Fraction of the ticket's edges present in the source."""
    kept = sum(int(m.sum()) for m in surviving(ticket, source))
    total = sum(int(t.bool().sum()) for t in ticket)
    return kept / total if total else 1.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def fmt_pct(values: Sequence[float]) -> str:
    """'97.21 ± 0.14 (3)' in percent; '–' when there is nothing."""
    if not values:
        return "–"
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f} ({len(values)})"


def theory_width(density: float) -> float:
    """Width multiplier the theory asks of a source of this density.

    Gadhikar et al. (2023) show that a random ER network of density d approximates a target
    network when it is wider by a factor 1/log(1/sparsity), with sparsity = 1 - d, i.e.
    w(d) = 1 / ln(1 / (1 - d)). The factor falls below 1 for d > 1 - 1/e, where the bound
    asks for no widening; a source is never narrower than the dense network, so the factor
    is clipped at 1 (and w(1) = 1).
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"theory width needs a density in (0, 1], got {density}")
    if density >= 1.0:
        return 1.0
    return max(1.0, 1.0 / math.log(1.0 / (1.0 - density)))
