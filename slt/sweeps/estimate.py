"""What a sweep point costs before it runs: steps per epoch from the data's size and the
batch, and milliseconds per search step, timed here with `slt bench search`'s stepper or
read from a file `slt bench search --json` wrote.

A step's cost is mostly the network's layout (model, width, input shape, batch, precision,
scoring rule, scope): the convolutions and matmuls run dense whatever the source density.
Only the top-k and the score update run over the source's edges and shrink with it (a
ResNet-18 step at batch 128 on one CPU thread: 5.96 s at d = 0.5, 5.35 s at d = 0.2). So one
timing, at the densest source, serves every point of one `Network`, as an upper bound.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from slt.config.schema import Config
from slt.config.toml import toml_value
from slt.errors import ConfigError, SltError, first_line

# Training examples of the built-in datasets whose size is known without reading them.
TRAIN_SIZES = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000}

# Model keys that set the weights' values, not the layers' shapes: no effect on a step's cost.
VALUE_KEYS = ("name", "init", "init_scale")


@dataclass(frozen=True)
class Network:
    """What a search step's cost depends on, as `slt bench search` takes it: the model, the
    `--set` items of its layout and scoring rule, the input shape, the batch and the mode."""

    model: str
    settings: tuple[str, ...]
    shape: tuple[int, ...]
    batch: int
    mode: str

    def label(self) -> str:
        shape = "x".join(str(s) for s in self.shape)
        extra = f" ({', '.join(self.settings)})" if self.settings else ""
        return f"{self.model} {shape} batch {self.batch} {self.mode}{extra}"

    def bench_command(self) -> str:
        """The `slt bench search` line that times this network (for a --bench file)."""
        size = (f"{self.shape[1]}" if len(self.shape) == 3 and self.shape[0] == 3
                else f"{self.shape[1]}x{self.shape[0]}" if len(self.shape) == 3 else "?")
        sets = "".join(f" --set {s}" for s in self.settings)
        return (f"slt bench search --model {self.model} --input {size} --batch {self.batch} "
                f"--modes {self.mode}{sets} --json FILE")


def train_examples(cfg: Config) -> int | None:
    """Training examples per epoch: the limit, the planted task's size, or the dataset's
    known size; None for a dataset whose size is known only by reading it."""
    if cfg.data.train_limit:
        return cfg.data.train_limit
    if cfg.data.name == "planted_teacher":
        return cfg.data.train_size
    return TRAIN_SIZES.get(cfg.data.name)


def steps_per_epoch(cfg: Config) -> int | None:
    """Optimizer steps per epoch, as the search loop counts them (the last batch short)."""
    n = train_examples(cfg)
    return None if n is None else math.ceil(n / cfg.search.batch_size)


def _mode_name(cfg: Config) -> str:
    from slt.bench.search import Mode

    run = cfg.run
    return Mode(run.precision, run.channels_last, run.compile, run.deterministic).name


def network_of(cfg: Config, shape: tuple[int, ...]) -> Network:
    """The network a point's steps run: its layout keys set away from their defaults, as
    `--set` items `slt bench search` accepts (model keys, the scoring rule, the scope)."""
    model, search = cfg.model, cfg.search
    default_model, default_search = type(model)(), type(search)()
    items = []
    for f in fields(model):
        value = getattr(model, f.name)
        if f.name in VALUE_KEYS or value == getattr(default_model, f.name):
            continue
        if f.name == "kwargs":
            items += [f"model.kwargs.{k}={toml_value(v)}" for k, v in value]
        else:
            items.append(f"model.{f.name}={toml_value(value)}")
    if search.scorer != default_search.scorer:
        items.append(f"search.scorer={toml_value(search.scorer)}")
    items += [f"search.scorer.{k}={toml_value(v)}" for k, v in search.scorer_options]
    if search.scope != default_search.scope:
        items.append(f"search.scope={toml_value(search.scope)}")
    return Network(model.name, tuple(items), tuple(shape), search.batch_size, _mode_name(cfg))


def sweep_device(cfg: Config) -> str:
    """The device a point runs on: run.device, with auto as the engine reads it."""
    import torch

    if cfg.run.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.run.device


def time_step(net: Network, cfg: Config, device: str, steps: int, threads: int) -> float:
    """Median milliseconds of `steps` search steps of `net` (on random inputs, after one
    warm-up step) on `device`, with `threads` torch threads (0: as they are), at `cfg`'s
    source density and keep."""
    import torch

    from slt.bench.search import parse_mode, search_stepper
    from slt.bench.topk import Timer

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with search_stepper(net.model, net.shape, parse_mode(net.mode), net.batch, cfg.keep,
                            cfg.source.density, device, list(net.settings)) as (step, *_):
            timer = Timer(device)
            timer(step)  # warm-up: first allocations, kernel loading, lazy init
            times = [timer(step) for _ in range(steps)]
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times) * 1e3


@dataclass
class Timings:
    """Milliseconds per step by network, where they came from, and the networks that could
    not be timed (with the reason)."""

    ms: dict[Network, float]
    source: str
    failed: dict[Network, str]


def measure(networks: dict[Network, Config], steps: int, threads: int,
            log: Callable[[str], None]) -> Timings:
    """Time each network at the config given for it (its densest source still to run), on
    the device that config would use."""
    ms: dict[Network, float] = {}
    failed: dict[Network, str] = {}
    devices = set()
    for net, cfg in networks.items():
        device = sweep_device(cfg)
        devices.add(device)
        log(f"timing {net.label()} on {device}: 1 warm-up step and {steps} timed")
        try:
            ms[net] = time_step(net, cfg, device, steps, threads)
        except Exception as exc:  # one network that cannot run must not hide the others
            failed[net] = first_line(exc) if isinstance(exc, SltError) else \
                f"{type(exc).__name__}: {first_line(exc)}"
    if not networks:
        return Timings(ms, "no run left to time", failed)
    where = ", ".join(sorted(_device_name(d) for d in devices))
    return Timings(ms, f"median of {steps} search steps timed here ({where}) after one "
                   "warm-up, on random inputs", failed)


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} {torch.cuda.get_device_name(device)}"
    return device


def _row_network(row: Any, body: dict[str, Any]) -> tuple[Network, float]:
    """One row of a bench file as the network it timed and its ms/step."""
    from slt.bench.search import bench_config, parse_mode

    if not isinstance(row, dict):
        raise ConfigError(f"not a table but {type(row).__name__}")
    for key, kind, word in (("model", str, "text"), ("input", str, "text"),
                            ("batch", int, "whole number"), ("mode", str, "text"),
                            ("search_ms", (int, float), "number")):
        if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
            raise ConfigError(f"'{key}' is missing or not a {word}")
    ms = float(row["search_ms"])
    if not (math.isfinite(ms) and ms > 0):
        raise ConfigError(f"search_ms {row['search_ms']} is not a positive time")
    parts = row["input"].split("x")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"input {row['input']!r} is not a shape such as 3x32x32")
    overrides = body.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError("'overrides' is not a list of KEY=VALUE strings")
    keep, density = body.get("keep", 0.5), body.get("source_density", 1.0)
    cfg = bench_config(row["model"], parse_mode(row["mode"]), row["batch"], keep, density,
                       "cpu", overrides)
    return network_of(cfg, tuple(int(p) for p in parts)), ms


def read_bench(path: str | Path) -> Timings:
    """ms/step by network from a `slt bench search --json` file (its rows' search_ms; the
    first row of a network counts); one-line ConfigError for a file that is not one."""
    from slt.sweeps.record import read_record

    p = Path(path)
    body, why = read_record(p, "rows")
    if body is not None and not isinstance(body["rows"], list):
        why = f"'rows' is not a list (it is {type(body['rows']).__name__})"
    if why or body is None:
        raise ConfigError(f"--bench {p}: {why}; expected the JSON `slt bench search --json` "
                          "writes")
    ms: dict[Network, float] = {}
    for i, row in enumerate(body["rows"]):
        try:
            net, value = _row_network(row, body)
        except SltError as exc:
            raise ConfigError(f"--bench {p}: row {i + 1}: {first_line(exc)}") from None
        ms.setdefault(net, value)
    if not ms:
        raise ConfigError(f"--bench {p}: it has no rows")
    device = body.get("device_name") or body.get("device") or "an unnamed device"
    return Timings(ms, f"search_ms read from {p} ({device}, torch {body.get('torch', '?')})",
                   {})
