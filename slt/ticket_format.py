"""The ticket file format: its layer records, and its header read and checked field by field
before anything is allocated for it, so a crafted or damaged ticket is one TicketError naming
the file and the field."""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from slt.config.checks import from_dict
from slt.config.schema import Config
from slt.errors import SltError, TicketError, first_line
from slt.rundir import MAGIC, is_finite_number, is_whole_number
from slt.spec import DataSpec

if TYPE_CHECKING:
    from slt.capacity import NetworkLayout


FORMAT_VERSION = 1


HEADER_KEYS = ("config", "config_hash", "spec", "torch", "weights_sha256", "embedded_weights",
               "metrics", "densities", "layers", "buffers")


def unpack_mask(payload: memoryview, span: tuple[int, int], shape: tuple[int, ...]) -> Tensor:
    """The boolean mask packed in `span` of the payload (checked to hold exactly it)."""
    n = math.prod(shape)
    packed = np.frombuffer(payload, dtype=np.uint8, count=span[1], offset=span[0])
    return torch.from_numpy(np.unpackbits(packed, count=n).view(bool)).view(shape)


def read_header(body: bytes, path: Path) -> tuple[dict[str, Any], memoryview]:
    """The JSON header (a dict with every key) and the payload after it."""
    start = len(MAGIC) + 8
    (head_len,) = struct.unpack("<Q", body[len(MAGIC):start])
    if head_len > len(body) - start:
        raise TicketError(f"{path}: malformed ticket: the header length field says {head_len} "
                          f"bytes but the file holds {len(body) - start} after it")
    try:
        header = json.loads(body[start:start + head_len].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else type(exc).__name__
        raise TicketError(f"{path}: malformed ticket: the header is not JSON ({why})") from None
    if not isinstance(header, dict):
        raise TicketError(f"{path}: malformed ticket: the header is not a JSON object")
    if not is_whole_number(header.get("format")) or header["format"] != FORMAT_VERSION:
        shown = str(header.get("format"))[:40]
        raise TicketError(f"{path}: ticket format {shown} is not supported")
    missing = [k for k in HEADER_KEYS if k not in header]
    spec = header.get("spec")
    if missing or not isinstance(spec, dict) or not {"shape", "num_classes"} <= set(spec):
        raise TicketError(f"{path}: the ticket header lacks "
                          f"{', '.join(missing) or 'spec.shape or spec.num_classes'}; the file "
                          "was not written by slt (or by an incompatible version)")
    return header, memoryview(body)[start + head_len:]


def declared_layout(check: HeaderChecker, rows: Any, buffer_rows: Any) -> NetworkLayout:
    """The layout a ticket's header declares, for a config whose model or scheme is not
    registered here (a plug-in of the machine that searched it): checked for types and
    ranges only. Memory stays bounded all the same: every mask and weight span must lie
    inside the file, exactly as long as its shape needs."""
    from slt.capacity import LayerLayout, NetworkLayout

    check.that(isinstance(rows, list) and 0 < len(rows) <= 100_000, "layers",
               "is not a list of layer records")
    layers = []
    for i, row in enumerate(rows):
        field = f"layers[{i}]"
        check.that(isinstance(row, dict) and set(row) >= LAYER_KEYS, field,
                   f"is not a layer record with {', '.join(sorted(LAYER_KEYS))}")
        shape = row["shape"]
        check.that(isinstance(shape, list) and 1 <= len(shape) <= 5 and all(
            is_whole_number(n) and 1 <= n <= 2 ** 31 for n in shape), f"{field}.shape",
            f"is {shown(shape)}, not a list of 1 to 5 sizes in 1..2^31")
        check.that(isinstance(row["name"], str), f"{field}.name", "is not a string")
        check.that(isinstance(row["searched"], bool), f"{field}.searched",
                   "is not true or false")
        numel = math.prod(shape)
        check.that(is_whole_number(row["n_source"]) and 0 <= row["n_source"] <= numel,
                   f"{field}.n_source", f"is {shown(row['n_source'])}, outside 0..{numel}")
        layers.append(LayerLayout(row["name"], tuple(shape), row["searched"], row["n_source"]))
    check.that(isinstance(buffer_rows, list) and all(
        isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(
            r.get("shape"), list) and len(r["shape"]) <= 5 and all(
            is_whole_number(n) and 0 <= n <= 2 ** 31 for n in r["shape"]) for r in buffer_rows),
        "buffers", "is not a list of buffer records (name, shape, offset, length)")
    return NetworkLayout(tuple(layers), {r["name"]: tuple(r["shape"]) for r in buffer_rows})


def read_floats(check: HeaderChecker, payload: memoryview, offset: int, n: int,
                field: str) -> Tensor:
    """`n` finite float32 values at `offset` of the payload (a NaN or an infinity is malformed)."""
    array = np.frombuffer(payload, dtype="<f4", count=n, offset=offset).astype(np.float32)
    check.that(bool(np.isfinite(array).all()), field, "holds a NaN or an infinity")
    return torch.from_numpy(array)


LAYER_KEYS = frozenset({"name", "index", "shape", "searched", "n_source", "n_ticket",
                         "source", "ticket", "weight"})


_DENSITY_COUNTS = ("n_prunable", "n_source", "n_ticket")


_DENSITY_RATIOS = ("source_density", "ticket_density", "keep")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def shown(value: Any) -> str:
    """A header value for a message: short, whatever a crafted file put there."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class HeaderChecker:
    """Checks of one ticket's header: each failure is one TicketError naming the field;
    spans are remembered to refuse two fields sharing bytes."""

    def __init__(self, path: Path, payload_len: int) -> None:
        self.path, self.payload_len = path, payload_len
        self.spans: list[tuple[int, int, str]] = []

    def fail(self, field: str, problem: str) -> TicketError:
        return TicketError(f"{self.path}: malformed ticket field {field}: {problem}; the file "
                           "was altered or not written by slt")

    def that(self, ok: bool, field: str, problem: str) -> None:
        if not ok:
            raise self.fail(field, problem)

    def span(self, span: Any, length: int, field: str) -> tuple[int, int]:
        """[offset, length] of `length` bytes inside the payload: what the config's shape
        needs, never what the header claims."""
        self.that(isinstance(span, list) and len(span) == 2 and all(map(is_whole_number, span)),
                  field, f"is {shown(span)}, not an [offset, length] pair of integers")
        offset, size = span
        self.that(size == length, field, f"spans {size} bytes, but the config's shape needs "
                  f"{length}")
        self.that(0 <= offset <= self.payload_len - size, field,
                  f"starts at byte {offset}, outside the {self.payload_len}-byte payload")
        for start, n, other in self.spans:  # two fields never share bytes
            self.that(offset + size <= start or start + n <= offset, field,
                      f"overlaps {other} in the payload")
        if size:
            self.spans.append((offset, size, field))
        return offset, size

    def network(self, header: dict[str, Any]
                ) -> tuple[Config, DataSpec, NetworkLayout | None]:
        """The config, the data spec and the layout of the network they build (meta);
        None for the layout when the config names a model or scheme this machine has not
        registered (a plug-in), so that its ticket still reads (`slt report` elsewhere)."""
        from slt.capacity import network_layout
        from slt.models import model_known
        from slt.source import SCHEMES

        raw = header["config"]
        self.that(isinstance(raw, dict), "config", "is not a table of sections")
        try:
            cfg = from_dict(raw, origin=f"{self.path} (its config)")
        except SltError as exc:
            raise self.fail("config", first_line(exc)) from None
        spec = header["spec"]
        shape, classes = spec["shape"], spec["num_classes"]
        self.that(isinstance(shape, list) and 1 <= len(shape) <= 4 and all(
            is_whole_number(n) and 1 <= n <= 2 ** 31 for n in shape), "spec.shape",
            f"is {shown(shape)}, not a list of 1 to 4 sizes in 1..2^31")
        self.that(is_whole_number(classes) and 1 <= classes <= 2 ** 31, "spec.num_classes",
                  f"is {shown(classes)}, not a count in 1..2^31")
        data_spec = DataSpec(tuple(shape), classes)
        try:  # never imports a python: reference's code: its header's own layout serves
            model_known(cfg.model.name, trusted=False)
        except SltError:
            return cfg, data_spec, None
        if cfg.source.scheme not in (*SCHEMES, "custom"):
            return cfg, data_spec, None
        # a model reference's build is bounded by what the file describes: its arguments
        # cannot ask for a model far larger than the layers and buffers it lists
        rows = [r for key in ("layers", "buffers") if isinstance(header[key], list)
                for r in header[key]]
        try:
            layout = network_layout(cfg, data_spec, max_parameters=4 * len(rows) + 64)
        except SltError as exc:
            raise self.fail("config", first_line(exc)) from None
        except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
            raise self.fail("config", f"its model cannot be laid out for input "
                            f"{list(shape)} ({type(exc).__name__}: {first_line(exc)})") from None
        return cfg, data_spec, layout

    def header_values(self, header: dict[str, Any], layers: list[TicketLayer]) -> None:
        """The plain values: strings, digests, metrics and the densities of the layers."""
        for key in ("torch", "config_hash"):
            value = header[key]
            self.that(isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable(),
                      key, f"is {shown(value)}, not a short version or hash string")
        self.that(isinstance(header["weights_sha256"], str)
                  and _SHA256.fullmatch(header["weights_sha256"]) is not None,
                  "weights_sha256", f"is {shown(header['weights_sha256'])}, not 64 hex digits")
        if "scorer" in header:
            self.that(isinstance(header["scorer"], str), "scorer", "is not a name")
        if "libraries" in header:
            libs = header["libraries"]
            self.that(isinstance(libs, dict) and len(libs) <= 8 and all(
                isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 64
                and 0 < len(v) <= 64 and v.isprintable() for k, v in libs.items()),
                "libraries", f"is {shown(libs)}, not a table of library versions")
        metrics = header["metrics"]
        self.that(isinstance(metrics, dict), "metrics", "is not a table of numbers")
        for key, value in metrics.items():
            self.that(is_finite_number(value), f"metrics.{key}",
                      f"is {shown(value)}, not a finite number")
            self.that(not key.endswith("_acc") or 0 <= value <= 1, f"metrics.{key}",
                      f"is {value}, outside 0..1")
        dens = header["densities"]
        self.that(isinstance(dens, dict), "densities", "is not a table")
        searched = [tl for tl in layers if tl.searched]
        counts = {"n_prunable": sum(tl.mask.numel() for tl in searched),
                  "n_source": sum(tl.n_source for tl in searched),
                  "n_ticket": sum(tl.n_ticket for tl in searched)}
        for key in _DENSITY_COUNTS:
            self.that(key in dens and dens[key] == counts[key] and is_whole_number(dens[key]),
                      f"densities.{key}", f"is {shown(dens.get(key))}, but the layers hold "
                      f"{counts[key]}")
        for key in _DENSITY_RATIOS:
            self.that(is_finite_number(dens.get(key)) and 0 <= dens[key] <= 1, f"densities.{key}",
                      f"is {shown(dens.get(key))}, not a fraction")
        dense = dens.get("dense_layers")
        self.that(isinstance(dense, list) and dense == [tl.name for tl in layers
                                                        if not tl.searched],
                  "densities.dense_layers", f"is {shown(dense)}, not the config's dense layers")


@dataclass
class TicketLayer:
    """One prunable layer of a ticket; masks are boolean tensors of the weight's shape."""

    name: str
    index: int
    shape: tuple[int, ...]
    searched: bool
    source_mask: Tensor
    mask: Tensor
    weight: Tensor | None = None  # only in tickets saved with embed_weights

    @property
    def n_source(self) -> int:
        return int(self.source_mask.sum())

    @property
    def n_ticket(self) -> int:
        return int(self.mask.sum())
