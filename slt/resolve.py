"""A config about to run: the scoring rule's declared settings filled in, every name
looked up in its registry.

`slt.config` checks a config on its own terms and imports no other part of slt, so a
run's stored config.toml reads back without the plug-ins it names (`slt report` on runs
whose scoring rule is not installed here). What a command needs before it runs — the
dataset, model, init, scheme and rule registered, the rule's options typed, its optimizer
settings applied — happens here, once, where the config is loaded.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from slt import config
from slt.config.schema import Config, SearchConfig
from slt.errors import ConfigError


def load(path: str | os.PathLike[str] | None = None,
         overrides: list[str] | None = None) -> Config:
    """A TOML config (a path, a packaged name, or the defaults) with `--set` overrides,
    resolved for running."""
    return resolve(config.load_raw(path, overrides), str(path) if path else "config")


def resolve(raw: dict[str, Any], origin: str = "config") -> Config:
    """The Config of `raw` (nested TOML tables) ready to run: the user's values first, then
    the scoring rule's declared settings, then slt's defaults; every name registered; the
    rule's options typed with every field filled, so equal settings give one run id
    (lam = 0 and lam = 0.0, or a default given or left out)."""
    from slt.scorers.lookup import scorer_options  # torch: only when a config is resolved

    raw = dict(raw)
    search = raw.get("search", {})
    if isinstance(search, dict):
        raw["search"] = {**_rule_filled(config.split_scorer_table(search, origin)), **search}
    cfg = config.from_dict(raw, origin)
    check_names(cfg)
    options = dataclasses.asdict(scorer_options(cfg.search.scorer,
                                                dict(cfg.search.scorer_options)))
    return dataclasses.replace(cfg, search=dataclasses.replace(
        cfg.search, scorer_options=tuple(sorted(options.items()))))


def check_names(cfg: Config) -> None:
    """Every name the config gives is registered (one did-you-mean line otherwise)."""
    from slt import data, models, source
    from slt.scorers.lookup import scorer_options  # torch: only when a config is resolved

    data.DATASETS.get(cfg.data.name)
    models.model_known(cfg.model.name)
    source.INITS.get(cfg.model.init)
    scorer_options(cfg.search.scorer, dict(cfg.search.scorer_options))
    if cfg.source.scheme != "custom":
        source.SCHEMES.get(cfg.source.scheme)


def _rule_filled(search: dict[str, Any]) -> dict[str, Any]:
    """The rule's declared settings that a [search] table (file and --set applied, scorer
    table split) leaves unset. An unknown rule fills nothing; check_names() names it."""
    from slt.scorers.lookup import (  # torch: only when a config is resolved
        rule_optimizer,
        scorer_class,
    )

    name = search.get("scorer", SearchConfig.scorer)
    if not isinstance(name, str):
        return {}  # a wrong type: from_dict reports it
    try:
        declared = rule_optimizer(scorer_class(name))
    except ConfigError:
        return {}  # reported with the rest of the config
    return {k: v for k, v in declared.items() if k not in search}


def rule_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """Which search.* values of the config built from `raw` come from its scoring rule's
    declaration (key -> value), for `slt config show`."""
    body = raw.get("search", {})
    if not isinstance(body, dict):
        return {}
    return _rule_filled(config.split_scorer_table(body, "config"))
