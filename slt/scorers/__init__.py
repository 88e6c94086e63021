"""Scoring rules. Each rule is one file that registers a `Scorer` subclass by name; other
packages add rules through the `slt.scorers` entry-point group (see docs/scorers.md)."""

from __future__ import annotations

from typing import Any

from slt.scorers import (  # noqa: F401  (each module registers its rules)
    bernoulli,
    biprop,
    edge_popup,
    gem_miner,
    iterand,
    signed_supermask,
)
from slt.scorers.base import Budget, EpochContext, Scorer, StraightThroughTopK, topk_masks
from slt.scorers.registry import SCORERS

__all__ = ["SCORERS", "Budget", "EpochContext", "Scorer", "StraightThroughTopK",
           "create_scorer", "scorer_options", "topk_masks"]


def scorer_class(name: str) -> type[Scorer]:
    """The registered rule `name`, checked to be a Scorer whose declared optimizer settings
    name real search.* keys with possible values (a ConfigError otherwise)."""
    from slt.resolve import rule_optimizer

    cls = SCORERS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        from slt.errors import ConfigError

        raise ConfigError(f"scorer '{name}' is not a slt.scorers.Scorer subclass")
    rule_optimizer(cls)
    return cls


def scorer_options(name: str, given: dict[str, Any]) -> Any:
    """The validated Options of rule `name` from its [search.scorer] table."""
    from slt.config import coerce
    from slt.scorers.base import options_of

    return options_of(scorer_class(name), given, coerce)


def create_scorer(name: str, options: dict[str, Any] | None = None) -> Scorer:
    return scorer_class(name)(scorer_options(name, options or {}))
