"""Run configuration: frozen dataclasses per section, TOML loading, overrides, validation.

Every field carries its help text (`metadata["help"]`), so `slt config show` and the
docs come from one place. A config is validated before any work starts or any file is
written; each mistake is one `ConfigError` line naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from slt.errors import ConfigError, did_you_mean, first_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults: configs are frozen")
    return field(default=default, metadata={"help": help, **kw})


def default_data_root() -> str:
    """`$SLT_DATA` when set, else ./data (resolved when the config is loaded)."""
    return os.environ.get("SLT_DATA", "./data")


@dataclass(frozen=True)
class DataConfig:
    name: str = _f("mnist", "dataset: mnist, fashion_mnist, cifar10, cifar100, imagefolder, "
                   "planted_teacher")
    root: str = _f("", "where datasets live; empty means $SLT_DATA, else ./data")
    download: bool = _f(False, "let torchvision download a missing dataset")
    augment: bool = _f(True, "random crop (pad 4) and horizontal flip for 32x32 colour images")
    # Planted-teacher task: inputs ~ N(0, I), labels = argmax of a random teacher MLP.
    input_dim: int = _f(32, "planted teacher: input dimension")
    num_classes: int = _f(10, "planted teacher: number of classes")
    teacher_hidden: int = _f(64, "planted teacher: hidden width of the random teacher MLP")
    train_size: int = _f(8192, "planted teacher: number of training examples")
    test_size: int = _f(2048, "planted teacher: number of test examples")
    seed: int = _f(0, "planted teacher: seed of the teacher and of its examples")
    stream: bool = _f(False, "read image files from disk through DataLoader workers instead "
                      "of holding the dataset in memory (same samples in the same order)")
    workers: int = _f(2, "DataLoader worker processes when data.stream")
    train_limit: int = _f(0, "use a class-balanced subset of this many training examples "
                          "(0: all)")
    test_limit: int = _f(0, "use a class-balanced subset of this many test examples (0: all)")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("mlp", "architecture: mlp, conv2, conv4, conv6, conv8, vgg16, resnet18, "
                   "resnet20, resnet50")
    width: float = _f(1.0, "width multiplier of every hidden layer")
    hidden: tuple[int, ...] = _f((300, 100), "mlp: hidden layer sizes before the width multiplier")
    init: str = _f("kaiming_normal", "weight init: kaiming_normal or signed_constant")
    init_scale: str = _f("none", "divide the init std by sqrt of this per-layer density: "
                         "none, source or ticket")
    bn_affine: bool = _f(False, "learn BatchNorm scale and shift (off: only scores are learned)")
    first_layer_dense: bool = _f(False, "keep the first layer dense and out of the search")
    last_layer_dense: bool = _f(False, "keep the last layer dense and out of the search")


@dataclass(frozen=True)
class SourceConfig:
    density: float = _f(1.0, "source density d: fraction of prunable weights in the random source")
    scheme: str = _f("uniform", "layerwise scheme: uniform, er, erk, balanced, pyramidal, custom "
                     "(custom ignores density and needs search.keep)")
    layer_densities: tuple[float, ...] = _f((), "custom scheme: one density per searched layer")
    seed: int = _f(0, "seed of the source mask (edge priorities); weights do not depend on it")


@dataclass(frozen=True)
class SearchConfig:
    scorer: str = _f("edge-popup", "scoring rule (`slt scorers` lists them); its options go in "
                     "a [search.scorer] table: name = \"...\", option = value")
    scorer_options: tuple[tuple[str, Any], ...] = _f(
        (), "the rule's options from [search.scorer] (set there, not here)")
    keep: float | None = _f(None, "fraction of source edges the ticket keeps (edge-popup's k); "
                            "0.5 when neither keep nor ticket_density is given")
    ticket_density: float | None = _f(None, "fraction of all prunable weights the ticket keeps")
    scope: str = _f("layer", "top-k per layer (layer) or over all layers at once (global)")
    epochs: int = _f(10, "training epochs of the score search")
    lr: float = _f(0.1, "peak learning rate of the scores")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "SGD weight decay on the scores")
    nesterov: bool = _f(False, "Nesterov momentum")
    warmup_epochs: float = _f(0.0, "linear warmup before the cosine schedule, in epochs")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss")
    batch_size: int = _f(128, "training batch size")
    eval_batch_size: int = _f(1000, "evaluation batch size")


@dataclass(frozen=True)
class RunConfig:
    seed: int = _f(0, "seed of the weights, scores and data order; the source does not use it")
    device: str = _f("auto", "auto (cuda when present), cpu or cuda")
    threads: int = _f(0, "CPU threads for torch; 0 leaves torch's default")
    progress: bool = _f(True, "show a progress bar")
    checkpoint_every: int = _f(0, "also checkpoint every this many steps inside an epoch "
                               "(0: at the end of each epoch only); resume is exact either way")
    sync_bn: bool = _f(False, "synchronise BatchNorm batch statistics across processes "
                       "(data-parallel search; CUDA only)")
    precision: str = _f("fp32", "fp32, bf16 or fp16: autocast of forward and backward; scores, "
                        "optimizer state and the top-k stay fp32 (fp16 adds a grad scaler)")
    channels_last: bool = _f(False, "convolutions in channels-last memory format")
    compile: bool = _f(False, "torch.compile the forward pass")
    deterministic: bool = _f(True, "deterministic algorithms (exact resume); false allows "
                             "cuDNN benchmark mode")
    tensorboard: bool = _f(False, "also write TensorBoard event files (per-epoch scalars, "
                           "per-step loss and lr) in the run directory; needs the tb extra")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # --- derived values -------------------------------------------------------------------
    @property
    def keep(self) -> float:
        """Fraction of source edges kept (derived from ticket_density when that is given)."""
        if self.search.keep is not None:
            return self.search.keep
        assert self.search.ticket_density is not None
        return self.search.ticket_density / self.source.density

    @property
    def ticket_density(self) -> float:
        """Absolute ticket density aimed at (for a custom scheme: of source.density, which the
        layer list may not match; the built network reports the real one)."""
        if self.search.ticket_density is not None:
            return self.search.ticket_density
        assert self.search.keep is not None
        return self.search.keep * self.source.density

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s.name: _section_dict(getattr(self, s.name)) for s in fields(self)}


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "source": SourceConfig,
    "search": SearchConfig,
    "run": RunConfig,
}

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


def _section_dict(section: Any) -> dict[str, Any]:
    out = {}
    for f in fields(section):
        value = getattr(section, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    if isinstance(section, SearchConfig):
        # [search.scorer] is one table: the rule's name and its options
        options = out.pop("scorer_options")
        if options:
            out["scorer"] = {"name": section.scorer, **dict(section.scorer_options)}
    return out


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


# --- typing of values --------------------------------------------------------------------


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


def parse_value(text: str) -> Any:
    """TOML syntax for the value (1, 0.5, true, [1, 2], "x"); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (ValueError, RecursionError):  # not TOML (or nested past Python's stack)
        return text


# --- building a config -------------------------------------------------------------------


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


# --- overrides -----------------------------------------------------------------------------

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


def check_key(dotted: str, origin: str) -> None:
    """ConfigError unless `dotted` names a config key (e.g. source.density) or a scoring
    rule's option (search.scorer.NAME, checked against the rule when the config is built)."""
    if dotted.startswith("search.scorer.") and dotted.count(".") == 2:
        return
    keys = [k for k, _, _ in describe()]
    if dotted not in keys:
        raise ConfigError(f"{origin}: unknown key '{dotted}'{did_you_mean(dotted, keys)}")


def parse_override(item: str) -> tuple[str, Any]:
    """One `--set section.key=value` (or search.scorer.OPTION=value) as (key, typed value)."""
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got '{item}'")
    dotted, text = (part.strip() for part in item.split("=", 1))
    if len(dotted.split(".")) != 2 and not dotted.startswith("search.scorer."):
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
    here = Path(__file__).resolve().parent
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


# --- validation ----------------------------------------------------------------------------

CHOICES = {
    ("model", "init_scale"): ("none", "source", "ticket"),
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
        for key, value in _section_dict(getattr(cfg, section)).items():
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
    if cfg.model.width <= 0:
        raise ConfigError(f"model.width must be positive, got {cfg.model.width}")
    if any(h <= 0 for h in cfg.model.hidden):
        raise ConfigError("model.hidden sizes must be positive")
    positive = {
        "search.epochs": s.epochs, "search.batch_size": s.batch_size,
        "search.eval_batch_size": s.eval_batch_size, "data.input_dim": cfg.data.input_dim,
        "data.num_classes": cfg.data.num_classes, "data.teacher_hidden": cfg.data.teacher_hidden,
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


# --- serialisation and identity -----------------------------------------------------------


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


def dense_source(cfg: Config) -> bool:
    """Whether the source is the whole network, whatever the scheme (a named scheme at
    density 1)."""
    return cfg.source.scheme != "custom" and cfg.source.density >= 1.0


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
        for section, values in cfg.to_dict().items()
    }
    if cfg.data.name == "imagefolder":
        body["data"]["root"] = str(Path(cfg.data.root).expanduser().resolve())
    if dense_source(cfg):
        body["source"]["scheme"] = "uniform"
    body["search"]["keep"] = round(cfg.keep, 12)
    body["search"]["ticket_density"] = round(cfg.ticket_density, 12)
    text = json.dumps(body, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def config_hashes(cfg: Config) -> tuple[str, str]:
    """Both hashes a run of `cfg` may carry in its files: today's, then the legacy one."""
    return config_hash(cfg), legacy_config_hash(cfg)


def _run_name(cfg: Config, digest: str) -> str:
    if cfg.source.scheme == "custom":
        size = f"custom-k{cfg.keep:.4g}"
    else:
        size = f"d{cfg.source.density:g}-t{cfg.ticket_density:.4g}"
    return f"{cfg.data.name}-{cfg.model.name}-{size}-{digest}"


def run_id(cfg: Config) -> str:
    """Readable prefix plus the config hash, e.g. mnist-mlp-d0.2-t0.1-3f9a...."""
    return _run_name(cfg, config_hash(cfg))


def legacy_run_id(cfg: Config) -> str:
    """The run directory name `cfg` had before only changed values were hashed."""
    return _run_name(cfg, legacy_config_hash(cfg))


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
