"""Scoring rules looked up by name: the registered class, checked; its options typed from
the config's [search.scorer] table; the optimizer settings it declares, checked against
the search.* keys a rule may set."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

from slt.config.checks import check_optimizer, coerce
from slt.config.schema import SearchConfig
from slt.errors import ConfigError, did_you_mean
from slt.scorers import (  # noqa: F401  (each module registers its rules)
    bernoulli,
    biprop,
    edge_popup,
    gem_miner,
    iterand,
    signed_supermask,
)
from slt.scorers.base import Scorer, options_of
from slt.scorers.registry import SCORERS

# search.* keys a scoring rule may declare (Scorer.optimizer): how its scores are optimised.
OPTIMIZER_KEYS = ("lr", "momentum", "weight_decay", "nesterov", "warmup_epochs")


def scorer_class(name: str) -> type[Scorer]:
    """The registered rule `name`, checked to be a Scorer whose declared optimizer settings
    name real search.* keys with possible values (a ConfigError otherwise)."""
    cls = SCORERS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise ConfigError(f"scorer '{name}' is not a slt.scorers.Scorer subclass")
    rule_optimizer(cls)
    return cls


def scorer_options(name: str, given: dict[str, Any]) -> Any:
    """The validated Options of rule `name` from its [search.scorer] table."""
    return options_of(scorer_class(name), given, coerce)


def create_scorer(name: str, options: dict[str, Any] | None = None) -> Scorer:
    """A new instance of rule `name` with its options from `options`."""
    return scorer_class(name)(scorer_options(name, options or {}))


def rule_optimizer(cls: Any) -> dict[str, Any]:
    """The optimizer settings scoring rule `cls` declares, typed and checked: a rule that
    names a key slt does not have, or an impossible value, is a ConfigError (so `slt
    scorers` lists it as unusable and only configs that name it fail)."""
    declared = getattr(cls, "optimizer", None) or {}
    rule = getattr(cls, "name", "") or cls.__name__
    if not isinstance(declared, Mapping):
        raise ConfigError(f"scorer '{rule}': optimizer must be a dict of search.* settings")
    hints = typing.get_type_hints(SearchConfig)
    values = {}
    for key, value in declared.items():
        if key not in OPTIMIZER_KEYS:
            allowed = ", ".join(f"search.{k}" for k in OPTIMIZER_KEYS)
            raise ConfigError(f"scorer '{rule}' declares optimizer setting '{key}'"
                              f"{did_you_mean(str(key), list(OPTIMIZER_KEYS))}; a rule may "
                              f"declare {allowed}")
        try:
            values[key] = coerce(f"search.{key}", value, hints[key])
        except ConfigError as exc:
            raise ConfigError(f"scorer '{rule}' declares {exc}") from None
        if isinstance(values[key], float) and not math.isfinite(values[key]):
            raise ConfigError(f"scorer '{rule}' declares search.{key} = {value}: not finite")
    try:
        check_optimizer(dataclasses.replace(SearchConfig(), **values))
    except ConfigError as exc:
        raise ConfigError(f"scorer '{rule}' declares an impossible setting: {exc}") from None
    return values
