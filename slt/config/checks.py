"""A raw (TOML) config made a checked `Config`: values coerced to their fields' types,
unknown keys named with a did-you-mean, impossible combinations refused."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from slt.config.schema import SECTIONS, Config, SearchConfig, default_data_root, section_dict
from slt.errors import ConfigError, did_you_mean


def split_scorer_table(body: dict[str, Any], origin: str) -> dict[str, Any]:
    """search.scorer given as a table {name, options...}: split into scorer + options."""
    if "scorer_options" in body:
        raise ConfigError(f"{origin}: give scorer options in a [search.scorer] table")
    table = body.get("scorer")
    if not isinstance(table, dict):
        return body
    table = dict(table)
    name = table.pop("name", "edge-popup")
    return {**body, "scorer": name, "scorer_options": tuple(sorted(table.items()))}


def _kwarg_value(key: str, value: Any) -> Any:
    """A factory argument as a frozen value: TOML scalars, lists as tuples."""
    value = plain_value(value)
    if isinstance(value, (list, tuple)):
        return tuple(_kwarg_value(key, v) for v in value)
    if isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        return value
    raise ConfigError(f"{key}: a factory argument must be a number, true/false, a string or "
                      f"a list of them, got {value!r:.60}")


def model_kwargs(value: Any) -> tuple[tuple[str, Any], ...]:
    """The [model.kwargs] table as sorted (name, value) pairs (so equal tables hash alike)."""
    if isinstance(value, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        value = dict(value)  # the pairs of a Config already built
    if not isinstance(value, dict):
        raise ConfigError(f"model.kwargs must be a table of factory arguments, got {value!r:.60}")
    for name in value:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"model.kwargs: {name!r:.40} is not an argument name")
    return tuple(sorted((k, _kwarg_value(f"model.kwargs.{k}", v)) for k, v in value.items()))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0])
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def plain_value(value: Any) -> Any:
    """numpy and torch values as the Python value they hold: a scalar (np.float64 from
    np.linspace, np.int64, np.bool_, a 0-dim tensor) as float / int / bool / str, an array
    or a tensor as a (nested) list; anything else unchanged, for `coerce` to judge.

    A float of less than double precision (np.float32(0.2), torch.tensor(0.2)) is taken as
    the shortest decimal that reads back to the same float32 (0.2, not 0.2000000029802...):
    that is the number the caller wrote, so it gets the run id of the plain float 0.2. A
    float64 is exactly a Python float and stays as it is."""
    module = type(value).__module__.split(".")[0]
    if module == "torch" and hasattr(value, "detach"):
        tensor = value.detach().cpu()
        if tensor.is_floating_point() and tensor.element_size() < 8:
            tensor = tensor.float()  # numpy has no bfloat16; float32 holds it exactly
        value, module = tensor.numpy(), "numpy"
    if module != "numpy" or not hasattr(value, "dtype"):
        return value
    if getattr(value, "ndim", 0) > 0:
        return [plain_value(v) for v in value]
    if value.dtype.kind == "f" and value.dtype.itemsize < 8:
        return float(str(value[()]))  # numpy prints a float32 as its shortest decimal
    return value.item()


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field type `tp`; ints are accepted where floats are, and
    numpy / torch scalars as the Python values they hold (`plain_value`)."""
    value = plain_value(value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return coerce(key, value, args[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(coerce(key, v, item) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(raw: dict[str, Any], origin: str = "config") -> Config:
    """Build a Config from nested dicts (TOML tables), checked on its own terms: types,
    ranges, choices. Names (dataset, model, scheme, scoring rule) are not looked up here:
    reading a run's own, fully resolved config.toml needs no plug-in installed. A config
    about to run goes through `slt.resolve`, which fills in the scoring rule's settings and
    looks the names up."""
    sections: dict[str, Any] = {}
    for name, body in raw.items():
        if name not in SECTIONS:
            raise ConfigError(
                f"{origin}: unknown section [{name}]{did_you_mean(name, list(SECTIONS))}"
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{origin}: [{name}] must be a table of keys")
        sections[name] = body
    built = {}
    for name, cls in SECTIONS.items():
        body = sections.get(name, {})
        hints = typing.get_type_hints(cls)
        known = [f.name for f in fields(cls)]
        if name == "search":
            body = split_scorer_table(body, origin)
        kwargs = {}
        for key, value in body.items():
            if key not in known:
                raise ConfigError(
                    f"unknown key {name}.{key}{did_you_mean(key, known)}"
                )
            if (name, key) == ("search", "scorer_options"):
                kwargs[key] = value  # typed against the rule's own options by slt.resolve
            elif (name, key) == ("model", "kwargs"):
                kwargs[key] = model_kwargs(value)
            else:
                kwargs[key] = coerce(f"{name}.{key}", value, hints[key])
        built[name] = cls(**kwargs)
    cfg = Config(**built)
    if cfg.search.keep is None and cfg.search.ticket_density is None:
        # edge-popup's default k: keep half of the source edges
        cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, keep=0.5))
    if not cfg.data.root:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=default_data_root()))
    validate(cfg)
    return cfg


# Keys that spell one quantity two ways: one table of settings gives at most one of each.
ALTERNATIVES: tuple[tuple[str, ...], ...] = (("search.keep", "search.ticket_density"),)


def check_alternatives(keys: Iterable[str], origin: str) -> None:
    """ConfigError when one table of settings (a --set list, a sweep's [set] or [axes], a
    sweep's --set list) names two spellings of one quantity: which one wins would depend on
    their order. One such key replacing the other given elsewhere (a file) stays allowed."""
    given = set(keys)
    for group in ALTERNATIVES:
        both = [k for k in group if k in given]
        if len(both) > 1:
            raise ConfigError(f"{origin}: {' and '.join(both)} both given; they are two "
                              "spellings of the ticket size, give exactly one")


CHOICES = {
    ("model", "init_scale"): ("none", "source", "ticket"),
    ("model", "bias"): ("zero", "random"),
    ("model", "norm"): ("fixed", "learned"),
    ("search", "scope"): ("layer", "global"),
    ("run", "device"): ("auto", "cpu", "cuda"),
    ("run", "precision"): ("fp32", "bf16", "fp16"),
}


def _check_density(key: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{key} must be in (0, 1], got {value}")


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first impossible value (names are slt.resolve's)."""
    for section in SECTIONS:
        for key, value in section_dict(getattr(cfg, section)).items():
            values = value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{section}.{key} must be a finite number, got {v}")
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(
                f"{section}.{key} must be one of {', '.join(allowed)}, got '{value}'"
                f"{did_you_mean(str(value), list(allowed))}"
            )
    if cfg.source.scheme == "custom" and not cfg.source.layer_densities:
        raise ConfigError("source.scheme = 'custom' needs source.layer_densities")
    if cfg.source.scheme == "custom" and cfg.search.ticket_density is not None:
        raise ConfigError("source.scheme = 'custom' sets its own density: give search.keep "
                          "(the fraction of source edges kept), not search.ticket_density")
    if cfg.source.layer_densities and cfg.source.scheme != "custom":
        raise ConfigError("source.layer_densities is only used with source.scheme = 'custom'")
    for i, d in enumerate(cfg.source.layer_densities):
        _check_density(f"source.layer_densities[{i}]", d)

    _check_density("source.density", cfg.source.density)
    s = cfg.search
    if (s.keep is None) == (s.ticket_density is None):
        raise ConfigError("give exactly one of search.keep and search.ticket_density")
    if s.keep is not None:
        _check_density("search.keep", s.keep)
    if s.ticket_density is not None:
        _check_density("search.ticket_density", s.ticket_density)
        if s.ticket_density > cfg.source.density + 1e-12:
            raise ConfigError(
                f"search.ticket_density ({s.ticket_density}) cannot exceed source.density "
                f"({cfg.source.density}): the ticket lives inside the source"
            )
    check_model(cfg.model)
    positive = {
        "search.epochs": s.epochs, "search.batch_size": s.batch_size,
        "search.eval_batch_size": s.eval_batch_size, "data.input_dim": cfg.data.input_dim,
        "data.num_classes": cfg.data.num_classes, "data.teacher_hidden": cfg.data.teacher_hidden,
        "data.teacher_depth": cfg.data.teacher_depth,
        "data.train_size": cfg.data.train_size, "data.test_size": cfg.data.test_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    check_optimizer(s)
    if s.warmup_epochs > s.epochs:
        raise ConfigError(f"search.warmup_epochs ({s.warmup_epochs}) exceeds search.epochs")
    for key, value in (("run.threads", cfg.run.threads), ("data.workers", cfg.data.workers),
                       ("data.train_limit", cfg.data.train_limit),
                       ("data.test_limit", cfg.data.test_limit),
                       ("run.checkpoint_every", cfg.run.checkpoint_every)):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    check_plant(cfg)


def check_plant(cfg: Config) -> None:
    """What a plant asks of the run: the student restricted to the planted edges computes
    the teacher exactly only when both are bias-free ReLU MLPs of one depth, every layer
    searched (a dense frozen layer would add its random weights to the plant's)."""
    m, d = cfg.model, cfg.data
    if not cfg.plant.enabled:
        if cfg.plant.in_source or cfg.plant.size_ticket or cfg.plant.seed:
            raise ConfigError("plant.seed, plant.in_source and plant.size_ticket need "
                              "plant.enabled = true")
        return
    if d.name != "planted_teacher":
        raise ConfigError(f"plant.enabled needs data.name = 'planted_teacher' (the teacher is "
                          f"what is planted), got '{d.name}'")
    if m.name != "mlp":
        raise ConfigError(f"plant.enabled needs model.name = 'mlp': the plant is exact in a "
                          f"ReLU MLP without biases or normalisation, and '{m.name}' is not one")
    if d.teacher_bias:
        raise ConfigError("plant.enabled needs data.teacher_bias = false: slt's mlp has no "
                          "biases, so the teacher it holds must balance its classes without one")
    if len(m.hidden) != d.teacher_depth:
        raise ConfigError(f"plant.enabled: the teacher has {d.teacher_depth} hidden layer(s) "
                          f"(data.teacher_depth) but the student has {len(m.hidden)} "
                          f"(model.hidden = {list(m.hidden)}); make them equal")
    if m.first_layer_dense or m.last_layer_dense or m.search_include or m.search_exclude:
        raise ConfigError("plant.enabled needs every layer searched: a dense frozen layer "
                          "adds its random weights to the planted ones (unset "
                          "first_layer_dense, last_layer_dense, search_include, search_exclude)")


# The prefixes of a model reference (slt.models.reference builds them).
REFERENCE_KINDS = ("torchvision:", "timm:", "python:")


def is_reference(name: str) -> bool:
    """Whether model.name refers to a model of another library or of the user's code."""
    return name.startswith(REFERENCE_KINDS)


def check_model(model: Any) -> None:
    """Sizes, and the model keys that apply to one kind of model only given to the other."""
    if model.width <= 0:
        raise ConfigError(f"model.width must be positive, got {model.width}")
    if any(h <= 0 for h in model.hidden):
        raise ConfigError("model.hidden sizes must be positive")
    if is_reference(model.name):
        if model.width != 1.0:
            raise ConfigError(f"model.width applies to built-in models only; {model.name} is "
                              "sized by its own arguments ([model.kwargs]): leave width at 1")
        if model.bn_affine:
            raise ConfigError("model.bn_affine applies to built-in models; for "
                              f"{model.name} set model.norm = \"learned\"")
        return
    for key, default in (("kwargs", ()), ("bias", "zero"), ("norm", "fixed")):
        if getattr(model, key) != default:
            hint = " (use model.bn_affine)" if key == "norm" else ""
            raise ConfigError(f"model.{key} applies to model references (torchvision:, timm:, "
                              f"python:); the built-in {model.name} has no such setting{hint}")


def check_optimizer(s: SearchConfig) -> None:
    """Ranges of the optimizer settings (shared by configs and rules' declarations)."""
    if s.lr <= 0:
        raise ConfigError(f"search.lr must be positive, got {s.lr}")
    for key, value in (("search.momentum", s.momentum),
                       ("search.label_smoothing", s.label_smoothing)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if s.weight_decay < 0 or s.warmup_epochs < 0:
        raise ConfigError("search.weight_decay and search.warmup_epochs must be >= 0")
