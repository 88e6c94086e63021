"""`slt bench search`: training throughput of a search step against a dense baseline.

The search step is `slt.engine.loop.Search.step`, called exactly as the search loop calls it
(scorer, top-k, autocast, grad scaler, optimizer and schedule included). The baseline is the
same architecture from the same builder with every masked layer swapped for a plain
`nn.Conv2d` / `nn.Linear` of its shape (BatchNorm, pooling and the rest unchanged), trained
densely with SGD (same momentum, weight decay, Nesterov) on all its weights, in the same
precision, memory format and compile mode, at the same batch. So the ratio is the price of
searching a mask over training the weights themselves.

Inputs are random: one fixed batch of standard-normal images and uniform labels per
(model, input), on the device, so neither side waits for data. Search and dense steps are
interleaved in blocks (the order flips every repetition) so machine drift hits both alike;
rows are medians of per-step times after warm-up, and ratios are taken within one run.
GPU times come from CUDA events, CPU times from perf counters.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slt import topk
from slt.bench.topk import Timer
from slt.config.checks import is_reference
from slt.config.schema import Config
from slt.config.toml import parse_override
from slt.engine.loop import Search
from slt.engine.platform import Platform
from slt.errors import ConfigError
from slt.layers import MaskedConv2d, MaskedLinear
from slt.models import build_model
from slt.models.reference import build_reference
from slt.network import build_network
from slt.resolve import load
from slt.scorers import EpochContext
from slt.spec import DataSpec

PRECISIONS = ("fp32", "bf16", "fp16")
FLAGS = {"channels_last": "channels_last", "cl": "channels_last", "compile": "compile",
         "nondet": "nondeterministic"}
INPUT = re.compile(r"^(\d+)(?:x(\d+))?$")  # "32" = 3x32x32, "28x1" = 1x28x28
NUM_CLASSES = 10
# Keys the bench sets itself from its own options; `--set` may not give them.
OWN_KEYS = {
    "model.name": "--model", "source.density": "--source-density", "search.keep": "--keep",
    "search.ticket_density": "--keep", "search.batch_size": "--batch", "run.device": "--device",
    "run.precision": "--modes", "run.channels_last": "--modes", "run.compile": "--modes",
    "run.deterministic": "--modes", "run.threads": "--threads",
}


@dataclass(frozen=True)
class Mode:
    """One speed mode: a precision plus channels_last / compile / non-deterministic flags."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = True

    @property
    def name(self) -> str:
        flags = [f for f, on in (("channels_last", self.channels_last), ("compile", self.compile),
                                 ("nondet", not self.deterministic)) if on]
        return "+".join([self.precision, *flags])


def parse_mode(text: str) -> Mode:
    """'bf16+channels_last+compile' -> Mode; a precision first, then any flags."""
    precision, *flags = text.strip().split("+")
    if precision not in PRECISIONS:
        raise ConfigError(f"mode '{text}': starts with a precision ({', '.join(PRECISIONS)}), "
                          f"then +flags ({', '.join(FLAGS)})")
    given = set()
    for flag in flags:
        if flag not in FLAGS:
            raise ConfigError(f"mode '{text}': unknown flag '{flag}'; flags: "
                              f"{', '.join(FLAGS)}")
        given.add(FLAGS[flag])
    return Mode(precision, "channels_last" in given, "compile" in given,
                "nondeterministic" not in given)


def default_modes(device: str) -> list[str]:
    """fp32 and bf16 on the CPU; on CUDA also bf16 in channels-last."""
    if device.startswith("cuda"):
        return ["fp32", "bf16", "bf16+channels_last"]
    return ["fp32", "bf16"]


def parse_input(text: str) -> tuple[int, ...]:
    """'32' -> (3, 32, 32) (CIFAR-like); '28x1' -> (1, 28, 28) (MNIST-like)."""
    match = INPUT.match(text.strip())
    if not match or int(match.group(1)) < 1 or (match.group(2) and int(match.group(2)) < 1):
        raise ConfigError(f"--input '{text}': give the image size S (3xSxS) or SxC (C "
                          "channels), e.g. 32 or 28x1")
    size = int(match.group(1))
    channels = int(match.group(2)) if match.group(2) else 3
    return channels, size, size


def input_name(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def bench_config(model: str, mode: Mode, batch: int, keep: float, source_density: float,
                 device: str, overrides: list[str]) -> Config:
    """The run config a search of this model in this mode would have (validated as any)."""
    for item in overrides:
        key, _ = parse_override(item)
        if key in OWN_KEYS:
            raise ConfigError(f"--set {key}: the bench sets it from {OWN_KEYS[key]}")
    # NAME,KEY=VALUE,...: a reference with its factory's arguments
    name, *arguments = model.split(",")
    for item in arguments:
        if "=" not in item:
            raise ConfigError(f"--model {model}: expected NAME,KEY=VALUE,... after the name")
    own = [f"model.name={json.dumps(name)}", *(f"model.kwargs.{a}" for a in arguments),
           f"source.density={source_density!r}",
           f"search.keep={keep!r}", f"search.batch_size={batch}",
           f"run.device={json.dumps(device.split(':')[0])}",
           f"run.precision={json.dumps(mode.precision)}",
           f"run.channels_last={str(mode.channels_last).lower()}",
           f"run.compile={str(mode.compile).lower()}",
           f"run.deterministic={str(mode.deterministic).lower()}", "run.progress=false"]
    return load(None, [*overrides, *own])


class _Shapes:
    """What `Search.__init__` reads of a data source: the example spec and the epoch
    length (only the learning-rate schedule's span depends on it, not a step's cost)."""

    def __init__(self, spec: DataSpec, steps_per_epoch: int = 1000) -> None:
        self.spec = spec
        self._steps = steps_per_epoch

    def len_train_batches(self, batch_size: int) -> int:
        return self._steps


def dense_model(cfg: Config, spec: DataSpec) -> nn.Module:
    """The run's architecture with plain, trainable Conv2d / Linear layers of the masked
    layers' shapes (no bias, as the masked ones); everything else as the builder made it.
    A model reference's is the factory's own module, every parameter trained."""
    if is_reference(cfg.model.name):
        return build_reference(cfg.model, spec)
    body = build_model(cfg.model, spec)
    for parent in list(body.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MaskedConv2d):
                out_ch, in_ch, k, _ = child.weight_shape
                setattr(parent, name, nn.Conv2d(in_ch, out_ch, k, stride=child.stride,
                                                padding=child.padding, bias=False))
            elif isinstance(child, MaskedLinear):
                out_f, in_f = child.weight_shape
                setattr(parent, name, nn.Linear(in_f, out_f, bias=False))
    return body


class DenseStep:
    """The dense baseline's optimisation step, mirroring `Search.step` for a world of one:
    autocast forward and loss, zero_grad, scaled backward, SGD step on all weights, schedule."""

    def __init__(self, cfg: Config, spec: DataSpec, device: torch.device) -> None:
        s, run = cfg.search, cfg.run
        self.label_smoothing = s.label_smoothing
        self.model = dense_model(cfg, spec).to(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=s.lr, momentum=s.momentum,
                                         weight_decay=s.weight_decay, nesterov=s.nesterov)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.device_type = device.type
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=run.precision == "fp16")
        self.channels_last = run.channels_last and len(spec.shape) == 3
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if run.compile else self.model
        self.model.train()

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = self.forward(x)
            loss = F.cross_entropy(out, y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss, out


def interleaved(calls: dict[str, Callable[[], object]], steps: int, warmup: int, block: int,
                timer: Timer) -> dict[str, list[float]]:
    """Seconds of each of `steps` timed calls per variant, after `warmup` untimed ones each.
    Variants take turns in blocks of `block` calls; the order flips every repetition."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            timer(calls[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(math.ceil(steps / block)):
        for name in names if rep % 2 == 0 else names[::-1]:
            for _ in range(min(block, steps - rep * block)):
                times[name].append(timer(calls[name]))
    return times


@contextmanager
def search_stepper(model: str, shape: tuple[int, ...], mode: Mode, batch: int, keep: float,
                   source_density: float, device: str, overrides: list[str]
                   ) -> Iterator[tuple[Callable[[], object], Config, nn.Module, Tensor, Tensor]]:
    """(one search step on a fixed random batch, its config, its network, the batch), the
    step exactly as the search loop makes it; the kernel's non-finite flag is read when the
    block ends."""
    cfg = bench_config(model, mode, batch, keep, source_density, device, overrides)
    dev = torch.device(device)
    spec = DataSpec(shape, NUM_CLASSES)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g).to(dev)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(dev)
    net = build_network(cfg, spec).to(dev)
    with tempfile.TemporaryDirectory(prefix="slt-bench-") as run_dir:
        search = Search(cfg, Path(run_dir), _Shapes(spec), net, Platform.local(dev),
                        lambda _: None)
        net.scorer.on_epoch_start(EpochContext(1, cfg.search.epochs, cfg.run.seed,
                                               net.searched_layers, net.budget))
        net.train()
        with topk.deferred_checks():  # as the search loop runs it: no flag read per step
            yield (lambda: search.step(x, y, batch)), cfg, net, x, y
            topk.check_deferred()


def bench_one(model: str, shape: tuple[int, ...], mode: Mode, batch: int, keep: float,
              source_density: float, device: str, steps: int, warmup: int, block: int,
              overrides: list[str]) -> dict:
    """One row: the search step and the dense step of one model and mode, interleaved."""
    with search_stepper(model, shape, mode, batch, keep, source_density, device,
                        overrides) as (step, cfg, net, x, y):
        torch.manual_seed(0)  # the dense layers' default init
        dense = DenseStep(cfg, DataSpec(shape, NUM_CLASSES), torch.device(device))
        times = interleaved({"search": step, "dense": lambda: dense.step(x, y)},
                            steps, warmup, block, Timer(device))
    search_s = statistics.median(times["search"])
    dense_s = statistics.median(times["dense"])
    dens = net.densities()
    n_dense = sum(p.numel() for p in dense.params)
    return {
        "model": model, "input": input_name(shape), "batch": batch, "mode": mode.name,
        "search_ms": search_s * 1e3, "dense_ms": dense_s * 1e3, "ratio": search_s / dense_s,
        "search_images_per_s": batch / search_s, "dense_images_per_s": batch / dense_s,
        "steps": steps, "warmup": warmup, "block": block,
        "search_step_ms": [t * 1e3 for t in times["search"]],
        "dense_step_ms": [t * 1e3 for t in times["dense"]],
        "n_prunable": dens["n_prunable"], "n_source": dens["n_source"],
        "n_ticket": dens["n_ticket"], "dense_trained_params": n_dense,
        "source_density": source_density, "keep": keep, "device": device,
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'model':10s} {'input':9s} {'batch':>5s}  {'mode':24s} {'search ms':>10s} "
          f"{'dense ms':>10s} {'ratio':>6s} {'search img/s':>12s} {'dense img/s':>11s}")
    for r in rows:
        print(f"{r['model']:10s} {r['input']:9s} {r['batch']:5d}  {r['mode']:24s} "
              f"{r['search_ms']:10.1f} {r['dense_ms']:10.1f} {r['ratio']:6.2f} "
              f"{r['search_images_per_s']:12.1f} {r['dense_images_per_s']:11.1f}")


GOAL = 1.2  # issue 10: a search step at most 1.2x a dense one, in the best mode


def goal_lines(rows: list[dict]) -> list[str]:
    """Per (model, input, batch): the mode with the fastest search step, and its ratio."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["input"], r["batch"]), []).append(r)
    lines = []
    for (model, shape, batch), group in groups.items():
        best = min(group, key=lambda r: r["search_ms"])
        met = "met" if best["ratio"] <= GOAL else "missed"
        lines.append(f"{model} {shape} batch {batch}: fastest search in {best['mode']} at "
                     f"{best['search_ms']:.1f} ms/step, {best['ratio']:.2f}x dense "
                     f"(goal <= {GOAL}x: {met})")
    return lines


def machine_threads() -> int:
    """CPU threads this process may use (its affinity, else the core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_search_bench(models: list[str], inputs: list[str], modes: list[str], batch: int,
                     keep: float, source_density: float, steps: int, warmup: int, block: int,
                     device: str, out: str | None = None, overrides: list[str] | None = None,
                     threads: int | None = None) -> list[dict]:
    """Every (model, input, mode) row, printed as a table and optionally written as JSON.
    All names and values are checked before the first timing."""
    overrides = overrides or []
    shapes = [parse_input(text) for text in inputs]
    parsed = [parse_mode(text) for text in modes]
    for model in models:  # unknown names and bad values fail here, before any timing
        for mode in parsed:
            cfg = bench_config(model, mode, batch, keep, source_density, device, overrides)
        for shape in shapes:  # shapes only (meta device): a model too deep for the input
            with torch.device("meta"):
                build_model(cfg.model, DataSpec(shape, NUM_CLASSES))
    threads = threads or machine_threads()
    torch.set_num_threads(threads)
    rows = []
    for model in models:
        for shape in shapes:
            for mode in parsed:
                rows.append(bench_one(model, shape, mode, batch, keep, source_density, device,
                                      steps, warmup, block, overrides))
    print_table(rows)
    for line in goal_lines(rows):
        print(line)
    print(f"{steps} timed steps per side after {warmup} warm-up, in blocks of {block}; "
          f"{torch.get_num_threads()} threads; random inputs and labels")
    if out:
        info = {"torch": torch.__version__, "device": device,
                "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda")
                else "cpu", "threads": torch.get_num_threads(), "source_density": source_density,
                "keep": keep, "overrides": overrides,
                "data": "one fixed batch of standard-normal inputs and uniform random labels"}
        Path(out).write_text(json.dumps({**info, "rows": rows}, indent=2))
        print(f"wrote {out}")
    return rows
