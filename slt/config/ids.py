"""Run ids: the hash of the values that set what a run computes.

Keys that only say where or how a run executes are left out; the legacy hash keeps the
run ids of runs written before every key entered it. tests/test_config_run_ids.py pins them."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from slt.config.checks import is_reference
from slt.config.schema import SECTIONS, Config, dense_source

# Keys that say where or how a run executes, not what it computes: left out of the run id.
NOT_HASHED = {("data", "root"), ("data", "download"), ("run", "device"), ("run", "threads"),
              ("data", "stream"), ("data", "workers"), ("run", "checkpoint_every"),
              ("run", "progress"), ("run", "tensorboard")}


# Keys that entered the hash only when set away from their default before every key did
# (legacy_config_hash: the run ids of runs written before that rule became general).
HASHED_IF_SET = {("data", "train_limit"), ("data", "test_limit"), ("run", "sync_bn"),
                 ("run", "precision"), ("run", "deterministic"), ("run", "channels_last"),
                 ("run", "compile")}


# Every key the legacy hash knew: keys added since never enter it, so it stays fixed.
LEGACY_KEYS = {
    "data": ("name", "root", "download", "augment", "input_dim", "num_classes", "teacher_hidden",
             "train_size", "test_size", "seed", "stream", "workers", "train_limit", "test_limit"),
    "model": ("name", "width", "hidden", "init", "init_scale", "bn_affine", "first_layer_dense",
              "last_layer_dense"),
    "source": ("density", "scheme", "layer_densities", "seed"),
    "search": ("scorer", "scorer_options", "keep", "ticket_density", "scope", "epochs", "lr",
               "momentum", "weight_decay", "nesterov", "warmup_epochs", "label_smoothing",
               "batch_size", "eval_batch_size"),
    "run": ("seed", "device", "threads", "progress", "checkpoint_every", "sync_bn", "precision",
            "channels_last", "compile", "deterministic"),
}


def _default(section: str, key: str) -> Any:
    return next(f.default for f in fields(SECTIONS[section]) if f.name == key)


def _canonical(value: Any) -> Any:
    """One spelling per value: tuples and lists as lists, mapping keys as strings (numbers
    need nothing here: the dataclass types already made 2 and 2.0 one value)."""
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    return value


def hashed_values(cfg: Config) -> dict[str, Any]:
    """What identifies a run: every `section.key` whose value differs from its default
    (open_lth's rule, so a new key with a default renames no run), less the keys that say
    where a run executes rather than what it computes (NOT_HASHED)."""
    body: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        values = getattr(cfg, section)
        for f in fields(cls):
            if (section, f.name) in NOT_HASHED or f.name in ("keep", "ticket_density"):
                continue
            value = getattr(values, f.name)
            if value != f.default:
                body[f"{section}.{f.name}"] = _canonical(value)
    if cfg.data.name == "imagefolder":  # the folder *is* the dataset here
        body["data.root"] = str(Path(cfg.data.root).expanduser().resolve())
    # At density 1 every scheme builds the same all-dense source: one run serves them all.
    if dense_source(cfg):
        body.pop("source.scheme", None)
        body.pop("plant.in_source", None)  # a dense source holds every planted edge anyway
    if cfg.plant.enabled and cfg.plant.size_ticket:  # the plant sizes the ticket
        body.pop("search.keep", None)
        body.pop("search.ticket_density", None)
        return body
    # keep/ticket_density are two spellings of one quantity: the derived pair, always.
    body["search.keep"] = round(cfg.keep, 12)
    body["search.ticket_density"] = round(cfg.ticket_density, 12)
    return body


def config_hash(cfg: Config) -> str:
    """Hash of what the run computes (not where it runs): equal configs share a run dir."""
    text = json.dumps(hashed_values(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def legacy_config_hash(cfg: Config) -> str:
    """The hash run ids had before only changed values were hashed: every key but a few.
    Runs written then are found under it and renamed once (slt.rundir.locate_run)."""
    body = {
        section: {k: v for k, v in values.items() if k in LEGACY_KEYS[section]
                  and (section, k) not in NOT_HASHED
                  and not ((section, k) in HASHED_IF_SET and v == _default(section, k))}
        for section, values in cfg.to_dict().items() if section in LEGACY_KEYS
    }
    if cfg.data.name == "imagefolder":
        body["data"]["root"] = str(Path(cfg.data.root).expanduser().resolve())
    if dense_source(cfg):
        body["source"]["scheme"] = "uniform"
    body["search"]["keep"] = round(cfg.keep, 12)
    body["search"]["ticket_density"] = round(cfg.ticket_density, 12)
    # A key the legacy hash never knew, set away from its default, names a run no slt of
    # that time could write: it enters the hash, so no old run is ever taken for it (a
    # planted run for the unplanted one). Unset, it leaves every legacy id as it was.
    newer = {k: v for k, v in hashed_values(cfg).items()
             if k.split(".")[1] not in LEGACY_KEYS.get(k.split(".")[0], ())}
    if newer:
        body["newer"] = newer
    text = json.dumps(body, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def config_hashes(cfg: Config) -> tuple[str, str]:
    """Both hashes a run of `cfg` may carry in its files: today's, then the legacy one."""
    return config_hash(cfg), legacy_config_hash(cfg)


def _run_name(cfg: Config, digest: str) -> str:
    if cfg.plant.enabled and cfg.plant.size_ticket:  # the ticket is the plant's size
        size = f"d{cfg.source.density:g}-tplant"
    elif cfg.source.scheme == "custom":
        size = f"custom-k{cfg.keep:.4g}"
    else:
        size = f"d{cfg.source.density:g}-t{cfg.ticket_density:.4g}"
    model = cfg.model.name
    if is_reference(model):  # a reference's ':' does not belong in a folder's name
        model = re.sub(r"[^A-Za-z0-9_.]+", "_", model)
    return f"{cfg.data.name}-{model}-{size}-{digest}"


def run_id(cfg: Config) -> str:
    """Readable prefix plus the config hash, e.g. mnist-mlp-d0.2-t0.1-3f9a...."""
    return _run_name(cfg, config_hash(cfg))


def legacy_run_id(cfg: Config) -> str:
    """The run directory name `cfg` had before only changed values were hashed."""
    return _run_name(cfg, legacy_config_hash(cfg))
