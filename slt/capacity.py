"""Will the search fit in memory? Checked from the model's shapes before anything is built.

A width that needs terabytes must end as one `slt: error:` line before the run directory
exists, not as a torch traceback halfway through `build_network` or as the OOM killer.
`check_fits` estimates the memory of a search from the exact weight counts (the model laid
out on the meta device) and refuses what cannot fit; `allocation_error` turns an allocation
that fails anyway (an estimate is rough; other processes use memory too) into the same kind
of one-line error. `network_layout` gives the same network's layers and buffers, also
from the meta device: what a ticket file's header must match before anything is read into
memory for it.

Bytes per weight, measured as the peak RSS of one-epoch CPU searches (`slt.engine.run.run_search`
on an MLP 1000 -> 40,000 -> 10, so 40.4M prunable weights, planted-teacher data, batch 128)
minus that of the same run with 16 hidden units; torch 2.15, edge-popup unless named:

================================================  =============
source density 1.0, kaiming / signed init        50.1 / 51.8 B
source density 1.0, scope global                 50.8 B
source density 1.0, the other six scorers        47.9 .. 51.0 B
source density 0.5                               29.1 B
source density 0.1, kaiming / signed init        16.3 / 16.9 B
MLP 1000 -> 6,000 -> 6,000 -> 10 (42.1M), signed 49.8 B
================================================  =============

A line above all of them: 13 B per prunable weight of the dense architecture (the layer
being built holds a dense int64 priority permutation and a dense init; every forward pass
saves each layer's expanded fp32 weight for backward) plus 40 B per source edge (int64
index, frozen weight, score, its gradient, SGD momentum, effective weight, top-k buffers).
Activations and the dataset are not counted: at widths that matter here, weights dominate.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from slt.config.schema import Config
from slt.errors import ConfigError, SltError
from slt.layers import masked_layers
from slt.models import build_model
from slt.network import WeightCount, count_weights, searched_flags
from slt.spec import DataSpec

BYTES_PER_WEIGHT = 13  # per prunable weight of the dense architecture (see the table above)
BYTES_PER_SOURCE_EDGE = 40  # per edge of the random source, on top of BYTES_PER_WEIGHT
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")
_CPU_ALLOC = re.compile(r"DefaultCPUAllocator: (can't allocate memory|not enough memory)"
                        r"|Storage size calculation overflowed|std::bad_alloc")
_TRIED_BYTES = re.compile(r"tried to allocate (\d+) bytes", re.IGNORECASE)
_TRIED_CUDA = re.compile(r"Tried to allocate ([\d.]+ [KMGTPE]?i?B)")


def search_bytes(count: WeightCount) -> int:
    """Rough memory of a search over a network of these sizes (see the module docstring)."""
    return BYTES_PER_WEIGHT * count.n_prunable + BYTES_PER_SOURCE_EDGE * count.n_source


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB', 24e9 -> '22 GiB'; past yobibytes, a plain exponent of bytes."""
    size = float(n)
    for unit in _UNITS:
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" or size >= 10 else f"{size:.1f} {unit}"
        size /= 1024
    return f"{float(n):.1e} B"


def physical_memory() -> int | None:
    """Bytes of RAM this process may use: physical memory, capped by a cgroup limit
    (containers); None where the platform does not say (then nothing is refused)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    if total <= 0:
        return None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def device_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes, what they are) of the memory a search on `device` lives in; None unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, total = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError, ValueError):
            return None
        return total, f"this GPU ({device}) has {human_bytes(total)} ({human_bytes(free)} free)"
    if device.type == "cpu":
        total = physical_memory()
        return None if total is None else (total, f"this machine has {human_bytes(total)}")
    return None


def _size_asked(cfg: Config) -> str:
    asked = f"model {cfg.model.name} at model.width={cfg.model.width:g}"
    if cfg.model.name == "mlp":
        asked += f", model.hidden={list(cfg.model.hidden)}"
    return asked


def _hint(cfg: Config, count: WeightCount | None = None, have: int | None = None) -> str:
    """What to lower; a sparser source only when the dense part alone would fit."""
    if cfg.model.width > 1:
        hint = "lower model.width"
    elif cfg.model.name == "mlp":
        hint = "lower model.hidden"
    else:
        hint = "pick a smaller model"
    if (count is not None and have is not None and cfg.source.scheme != "custom"
            and BYTES_PER_WEIGHT * count.n_prunable < have):
        hint += " or source.density"
    return hint


def _count(cfg: Config, spec: DataSpec, max_parameters: int | None = None) -> WeightCount:
    """count_weights, with a size past torch's 64-bit limits as a ConfigError."""
    try:
        return count_weights(cfg, spec, max_parameters)
    except (TypeError, RuntimeError, OverflowError) as exc:
        if "overflow" not in str(exc).lower():
            raise
        raise ConfigError(f"{_size_asked(cfg)} has a layer too large for torch's 64-bit "
                          f"sizes; {_hint(cfg)}") from None


@dataclass(frozen=True)
class LayerLayout:
    """One prunable layer as `build_network` would build it."""

    name: str
    shape: tuple[int, ...]
    searched: bool
    n_source: int


@dataclass(frozen=True)
class NetworkLayout:
    """The network of a config, known without allocating a weight: its prunable layers
    and the state-dict entries a ticket stores besides them (BatchNorm statistics, ...)."""

    layers: tuple[LayerLayout, ...]
    buffers: dict[str, tuple[int, ...]]


def stored_in_ticket(name: str, value: torch.Tensor) -> bool:
    """Whether a ticket stores this state-dict entry: not the scores (the search state) and
    not BatchNorm's integer step counters."""
    return not (name.endswith(".scores") or (not value.dtype.is_floating_point
                                              and value.dim() == 0))


def network_layout(cfg: Config, spec: DataSpec, max_parameters: int | None = None
                   ) -> NetworkLayout:
    """The layout of the network `build_network(cfg, spec)` builds, laid out on the meta
    device: what a file claiming to hold that network must match before anything is
    allocated for it (a ticket's header is checked against it). ConfigError for a config
    whose network cannot be laid out (an unknown model, a size past torch's limits).
    `max_parameters` bounds a model reference's build (what a file describes)."""
    count = _count(cfg, spec, max_parameters)
    with torch.device("meta"):
        body = build_model(cfg.model, spec, max_parameters=max_parameters)
    layers = masked_layers(body)
    if len(layers) != len(count.layers):  # the same model laid out twice: never differs
        raise ConfigError(f"model {cfg.model.name} builds a different network on each call")
    searched = searched_flags(cfg.model, [name for name, _, _ in count.layers])
    rows = tuple(
        LayerLayout(name, tuple(layer.weight_shape), is_searched, n_source)
        for layer, is_searched, (name, _, n_source) in zip(layers, searched, count.layers)
    )
    buffers = {name: tuple(value.shape) for name, value in body.state_dict().items()
               if stored_in_ticket(name, value)}
    return NetworkLayout(rows, buffers)


def check_fits(cfg: Config, spec: DataSpec, device: torch.device) -> None:
    """ConfigError when the search's network cannot fit in the memory of `device` (and, for
    CUDA, in RAM, where `build_network` builds it first); call before `build_network`.

    Compared with the total, not the free, memory: this refuses only what could never run,
    and an allocation that fails anyway goes through `allocation_error`.
    """
    count = _count(cfg, spec)
    need = search_bytes(count)
    places = [torch.device(device)]
    if places[0].type == "cuda":
        places.append(torch.device("cpu"))
    for place in places:
        have = device_memory(place)
        if have is not None and need > have[0]:
            raise ConfigError(
                f"{_size_asked(cfg)} has {_number(count.n_prunable)} prunable weights"
                f"{_source_part(cfg, count)}, needing about {human_bytes(need)} for the "
                f"search; {have[1]}: {_hint(cfg, count, have[0])}"
            )


def _number(n: int) -> str:
    """12,345 below a million, else 2.3e14."""
    return f"{n:,}" if n < 10 ** 6 else f"{n:.2g}".replace("e+", "e")


def _source_part(cfg: Config, count: WeightCount) -> str:
    if count.n_source == count.n_prunable:
        return ""
    return f" ({_number(count.n_source)} in the source at source.density {cfg.source.density:g})"


def is_allocation_failure(exc: BaseException) -> bool:
    """True for torch's out-of-memory errors (CUDA or CPU allocator) and MemoryError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and bool(_CPU_ALLOC.search(str(exc)))


def allocation_error(cfg: Config, exc: BaseException, spec: DataSpec | None = None
                     ) -> SltError | None:
    """A one-line SltError for an allocation that failed while building or searching the
    network of `cfg`, naming the model, its size and a hint; None for any other exception
    (re-raise it then). With `spec`, the message adds the estimate of `check_fits`."""
    if not is_allocation_failure(exc):
        return None
    text = str(exc)
    on = "the GPU" if isinstance(exc, torch.OutOfMemoryError) or "CUDA" in text else "the CPU"
    tried = ""
    if m := _TRIED_BYTES.search(text):
        tried = f" (an allocation of {human_bytes(int(m.group(1)))})"
    elif m := _TRIED_CUDA.search(text):
        tried = f" (an allocation of {m.group(1)})"
    elif "overflowed" in text:
        tried = " (a tensor past torch's 64-bit size limit)"
    estimate, small = "", False
    if spec is not None:
        try:
            count = count_weights(cfg, spec)
        except Exception:  # the estimate is a courtesy: the error stands without it
            count = None
        if count is not None:
            need = search_bytes(count)
            estimate = (f"; its {_number(count.n_prunable)} prunable weights need about "
                        f"{human_bytes(need)} for the search")
            have = device_memory(torch.device("cuda" if on == "the GPU" else "cpu"))
            small = have is not None and need < have[0] // 2
    # activations grow with the batch: the likelier cause on a GPU, the only one when the
    # network itself fits with room to spare
    if small:
        hint = "lower search.batch_size"
    else:
        hint = _hint(cfg) + (" or search.batch_size" if on == "the GPU" else "")
    return ConfigError(f"out of memory on {on}{tried} with {_size_asked(cfg)}{estimate}: "
                       f"{hint}")


@contextmanager
def allocation_errors(cfg: Config, spec: DataSpec | None = None) -> Iterator[None]:
    """`with allocation_errors(cfg, spec): ...` raises `allocation_error`'s one line in
    place of an allocation failure inside the block; other exceptions pass unchanged."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        error = allocation_error(cfg, exc, spec)
        if error is None:
            raise
        raise error from None
