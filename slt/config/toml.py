"""Configs as TOML: read a file or a packaged name, apply `--set` overrides, write a
resolved config back, describe its keys."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from slt.config.checks import check_alternatives, plain_value
from slt.config.schema import SECTIONS, Config
from slt.errors import ConfigError, did_you_mean, first_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def parse_value(text: str) -> Any:
    """TOML syntax for the value (1, 0.5, true, [1, 2], "x"); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (ValueError, RecursionError):  # not TOML (or nested past Python's stack)
        return text


def set_key(raw: dict[str, Any], dotted: str, value: Any, origin: str = "--set") -> None:
    """Set `section.key` to a (typed) value in nested dicts, in place; typed later by
    `from_dict`. Setting one of keep / ticket_density drops the other."""
    parts = dotted.strip().split(".")
    if parts[:2] == ["search", "scorer"] and len(parts) == 3 and parts[2]:
        # search.scorer.OPTION: one option of the rule, in its [search.scorer] table
        table = raw.setdefault("search", {})
        current = table.get("scorer", "edge-popup")
        scorer = dict(current) if isinstance(current, dict) else {"name": current}
        scorer[parts[2]] = value
        table["scorer"] = scorer
        return
    if parts[:2] == ["model", "kwargs"] and len(parts) == 3 and parts[2]:
        # model.kwargs.NAME: one argument of a model reference's factory
        table = raw.setdefault("model", {})
        kwargs = table.get("kwargs")
        table["kwargs"] = {**(kwargs if isinstance(kwargs, dict) else {}), parts[2]: value}
        return
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{origin}: expected section.key, got '{dotted}'")
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(
            f"unknown section '{section}' in {origin} {dotted}"
            f"{did_you_mean(section, list(SECTIONS))}"
        )
    table = raw.setdefault(section, {})
    if (section, key) == ("search", "scorer") and isinstance(table.get("scorer"), dict) \
            and isinstance(value, str):
        value = {**table["scorer"], "name": value}  # a new rule name keeps the options table
    table[key] = value
    # keep and ticket_density are alternatives: setting one replaces the other.
    if section == "search" and key in ("keep", "ticket_density"):
        table.pop("ticket_density" if key == "keep" else "keep", None)


# Tables whose own keys a dotted name may set: a scoring rule's options, a model's kwargs.
TABLE_KEYS = ("search.scorer.", "model.kwargs.")


def check_key(dotted: str, origin: str) -> None:
    """ConfigError unless `dotted` names a config key (e.g. source.density) or a scoring
    rule's option (search.scorer.NAME, checked against the rule when the config is built)."""
    if dotted.startswith(TABLE_KEYS) and dotted.count(".") == 2:
        return
    keys = [k for k, _, _ in describe()]
    if dotted not in keys:
        raise ConfigError(f"{origin}: unknown key '{dotted}'{did_you_mean(dotted, keys)}")


def parse_override(item: str) -> tuple[str, Any]:
    """One `--set section.key=value` (or search.scorer.OPTION=value) as (key, typed value)."""
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got '{item}'")
    dotted, text = (part.strip() for part in item.split("=", 1))
    if len(dotted.split(".")) != 2 and not dotted.startswith(TABLE_KEYS):
        raise ConfigError(f"--set expects section.key=value, got '{item}'")
    return dotted, parse_value(text)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to nested dicts (typed later by `from_dict`).
    The list is one table of settings: naming both search.keep and search.ticket_density
    in it is an error (`check_alternatives`)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    parsed = [parse_override(item) for item in overrides]
    check_alternatives((dotted for dotted, _ in parsed), "--set")
    for dotted, value in parsed:
        set_key(out, dotted, value)
    return out


def packaged_config_dir() -> Path:
    """configs/ of the source tree, or of the installed package."""
    here = Path(__file__).resolve().parents[1]  # slt/, the package root (this file is a wing's)
    for candidate in (here / "configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return here / "configs"


def resolve_config_path(path: str | os.PathLike[str]) -> Path:
    """A config path as given, else the packaged config of that file name."""
    p = Path(path)
    if p.is_file():
        return p
    packaged = packaged_config_dir() / p.name
    if packaged.is_file():
        return packaged
    raise ConfigError(f"config file not found: {path}")


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = resolve_config_path(path)
    try:
        with open(p, "rb") as fh:
            return tomllib.load(fh)
    except ValueError as exc:  # TOMLDecodeError, a bad encoding, an int past 4300 digits
        raise ConfigError(f"{path}: not valid TOML: {first_line(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None


def load_raw(path: str | os.PathLike[str] | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """The TOML config (or nothing) with `--set` overrides applied, not yet typed: what the
    user gave, before defaults."""
    raw = read_toml(path) if path is not None else {}
    return apply_overrides(raw, overrides or [])


def toml_value(value: Any) -> str:
    """`value` in TOML syntax; numpy and torch values as the Python values they hold."""
    value = plain_value(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(int(value))
    if isinstance(value, float):
        return repr(float(value))  # not a subclass's repr (np.float64(0.2) is a float)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table, e.g. search.scorer with its options
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Config, comments: Mapping[str, str] | None = None) -> str:
    """The fully resolved config as TOML (None-valued keys are left out); `comments` maps a
    dotted key to a note written after its value (e.g. where the value came from)."""
    comments = comments or {}
    lines = []
    for section, body in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in body.items():
            if value is not None:
                note = comments.get(f"{section}.{key}")
                lines.append(f"{key} = {toml_value(value)}" + (f"  # {note}" if note else ""))
        lines.append("")
    return "\n".join(lines)


def describe() -> list[tuple[str, str, str]]:
    """(key, default, help) for every config key, for docs and `slt config keys`."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if f.name == "scorer_options":
                continue  # set through the [search.scorer] table (see `slt scorers`)
            default = f.default if f.default is not dataclasses.MISSING else None
            rows.append((f"{section}.{f.name}", repr(default), f.metadata.get("help", "")))
    return rows
