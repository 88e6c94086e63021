"""Save and load found tickets.

A ticket file is small: the resolved config (which holds every seed), the bit-packed
source and ticket masks, the few non-prunable buffers the network needs to reproduce its
accuracy (BatchNorm running statistics), a SHA-256 of the weights the seeds regenerate
(so a torch version that draws different weights is detected), optionally the weights
themselves (`embed_weights`, the portable form), and a checksum of the whole file.

Layout: MAGIC, 8-byte little-endian header length, UTF-8 JSON header, payload, 32-byte
SHA-256 of everything before it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from slt.config import Config, config_hash, from_dict
from slt.errors import SltError, TicketError, first_line
from slt.fileio import atomic_write_bytes
from slt.rundir import MAGIC, is_finite_number, is_whole_number
from slt.spec import DataSpec

if TYPE_CHECKING:
    from slt.capacity import LayerLayout, NetworkLayout
    from slt.network import SltNetwork

FORMAT_VERSION = 1
HEADER_KEYS = ("config", "config_hash", "spec", "torch", "weights_sha256", "embedded_weights",
               "metrics", "densities", "layers", "buffers")


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


@dataclass
class Ticket:
    config: Config
    header: dict[str, Any]
    layers: list[TicketLayer]
    buffers: dict[str, Tensor] = field(default_factory=dict)
    path: Path | None = None  # the file it was read from: an export never overwrites it

    @property
    def metrics(self) -> dict[str, float]:
        return self.header.get("metrics", {})

    def to_module(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The ticket as a plain module of standard torch layers (see slt.export)."""
        from slt.export import to_module

        return to_module(self, device)

    def compact_masks(self) -> list[Tensor]:
        """Ticket masks over each searched layer's source edges (the network's layout)."""
        return [tl.mask.reshape(-1)[tl.source_mask.reshape(-1)] for tl in self.layers
                if tl.searched]


def weights_digest(net: SltNetwork) -> str:
    """SHA-256 of every layer's frozen weights (on source edges), in layer order."""
    h = hashlib.sha256()
    for layer in net.all_layers:
        h.update(layer.weight_src.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _pack(mask: Tensor) -> bytes:
    return np.packbits(mask.reshape(-1).cpu().numpy().astype(np.uint8)).tobytes()


def _unpack(payload: memoryview, span: tuple[int, int], shape: tuple[int, ...]) -> Tensor:
    """The boolean mask packed in `span` of the payload (checked to hold exactly it)."""
    n = math.prod(shape)
    packed = np.frombuffer(payload, dtype=np.uint8, count=span[1], offset=span[0])
    return torch.from_numpy(np.unpackbits(packed, count=n).view(bool)).view(shape)


def save(
    path: str | os.PathLike[str],
    cfg: Config,
    spec: DataSpec,
    net: SltNetwork,
    masks: list[Tensor],
    metrics: dict[str, float] | None = None,
    embed_weights: bool = False,
) -> None:
    """Write the ticket given by compact `masks` (one per searched layer) atomically.

    Rules that change or sign-fold weights (`stores_weights`) always embed them."""
    embed_weights = embed_weights or net.scorer.stores_weights
    payload = bytearray()

    def put(data: bytes) -> list[int]:
        offset = len(payload)
        payload.extend(data)
        return [offset, len(data)]

    layer_rows = []
    searched_masks = iter(masks)
    for info, layer in zip(net.infos, net.all_layers):
        source = layer.source_mask().cpu()
        full = torch.zeros(layer.numel, dtype=torch.bool)
        compact = next(searched_masks).cpu() if layer.searched else torch.ones(
            layer.n_source, dtype=torch.bool)
        full[layer.src_idx.cpu()] = compact
        row = {"name": info.name, "index": info.index, "shape": list(layer.weight_shape),
               "searched": layer.searched, "n_source": layer.n_source,
               "n_ticket": int(compact.sum()), "source": put(_pack(source)),
               "ticket": put(_pack(full)), "weight": None}
        if embed_weights:
            compact_w = net.scorer.ticket_weights(layer) if layer.searched else layer.weight_src
            weight = layer.expand(compact_w.detach()).cpu().to(torch.float32)
            row["weight"] = put(weight.contiguous().numpy().tobytes())
        layer_rows.append(row)
    buffer_rows = []
    for name, buf in net.body.state_dict().items():
        if name.endswith(".scores") or buf.dtype.is_floating_point is False and buf.dim() == 0:
            continue  # scores are the search state, not the ticket; skip BN step counters
        array = buf.detach().cpu().to(torch.float32).contiguous().numpy()
        buffer_rows.append({"name": name, "shape": list(buf.shape), **dict(
            zip(("offset", "length"), put(array.tobytes())))})
    header = {
        "format": FORMAT_VERSION, "config": cfg.to_dict(), "config_hash": config_hash(cfg),
        "spec": {"shape": list(spec.shape), "num_classes": spec.num_classes},
        "scorer": cfg.search.scorer, "torch": torch.__version__,
        "weights_sha256": weights_digest(net), "embedded_weights": embed_weights,
        "metrics": metrics or {}, "densities": net.densities(masks),
        "layers": layer_rows, "buffers": buffer_rows,
    }
    head = json.dumps(header).encode("utf-8")
    body = MAGIC + struct.pack("<Q", len(head)) + head + bytes(payload)
    atomic_write_bytes(path, body + hashlib.sha256(body).digest())


def load(path: str | os.PathLike[str]) -> Ticket:
    """Read and verify a ticket file.

    The checksum detects damage, not intent: anyone can rewrite a header and its checksum.
    So every header field is checked against the network its own config builds (laid out on
    the meta device, `slt.capacity.network_layout`) before anything is allocated for it, and
    every span must lie inside the file: memory stays a small multiple of the file's size.
    Any malformed field is one TicketError naming the file and the field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TicketError(f"cannot read ticket {path}: {exc.strerror}") from None
    if len(raw) < len(MAGIC) + 8 + 32 or not raw.startswith(MAGIC):
        raise TicketError(f"{path} is not an slt ticket file")
    body, digest = raw[:-32], raw[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise TicketError(f"{path}: checksum mismatch, the file is corrupt or truncated")
    try:
        return _parse(body, path)
    except TicketError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, struct.error, RuntimeError,
            RecursionError, OverflowError, MemoryError) as exc:
        # every field was checked: not slt's file, or a bug; one line either way
        raise TicketError(f"{path}: not a ticket this slt can read "
                          f"({type(exc).__name__}: {first_line(exc)})") from None


def _header(body: bytes, path: Path) -> tuple[dict[str, Any], memoryview]:
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


def _parse(body: bytes, path: Path) -> Ticket:
    header, payload = _header(body, path)
    check = _Checker(path, len(payload))
    cfg, spec, layout = check.network(header)
    embedded = header["embedded_weights"]
    check.that(isinstance(embedded, bool), "embedded_weights", "is not true or false")
    rows = header["layers"]
    if layout is None:  # a plug-in's model or scheme, not installed here: the header's own
        layout = _declared_layout(check, rows, header["buffers"])
    check.that(isinstance(rows, list) and len(rows) == len(layout.layers), "layers",
               f"must list the {len(layout.layers)} prunable layers of the config's model "
               f"{cfg.model.name}")
    layers = [_layer(check, i, row, want, payload, embedded)
              for i, (row, want) in enumerate(zip(rows, layout.layers))]
    buffers = _buffers(check, header["buffers"], layout.buffers, payload)
    check.header_values(header, layers)
    return Ticket(cfg, header, layers, buffers, path)


def _declared_layout(check: _Checker, rows: Any, buffer_rows: Any) -> NetworkLayout:
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
        check.that(isinstance(row, dict) and set(row) >= _LAYER_KEYS, field,
                   f"is not a layer record with {', '.join(sorted(_LAYER_KEYS))}")
        shape = row["shape"]
        check.that(isinstance(shape, list) and 1 <= len(shape) <= 5 and all(
            is_whole_number(n) and 1 <= n <= 2 ** 31 for n in shape), f"{field}.shape",
            f"is {_shown(shape)}, not a list of 1 to 5 sizes in 1..2^31")
        check.that(isinstance(row["name"], str), f"{field}.name", "is not a string")
        check.that(isinstance(row["searched"], bool), f"{field}.searched",
                   "is not true or false")
        numel = math.prod(shape)
        check.that(is_whole_number(row["n_source"]) and 0 <= row["n_source"] <= numel,
                   f"{field}.n_source", f"is {_shown(row['n_source'])}, outside 0..{numel}")
        layers.append(LayerLayout(row["name"], tuple(shape), row["searched"], row["n_source"]))
    check.that(isinstance(buffer_rows, list) and all(
        isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(
            r.get("shape"), list) and len(r["shape"]) <= 5 and all(
            is_whole_number(n) and 0 <= n <= 2 ** 31 for n in r["shape"]) for r in buffer_rows),
        "buffers", "is not a list of buffer records (name, shape, offset, length)")
    return NetworkLayout(tuple(layers), {r["name"]: tuple(r["shape"]) for r in buffer_rows})


def _layer(check: _Checker, i: int, row: Any, want: LayerLayout, payload: memoryview,
           embedded: bool) -> TicketLayer:
    """Layer `i` of the header checked against the config's, then its masks read."""
    field = f"layers[{i}]"
    check.that(isinstance(row, dict) and set(row) >= _LAYER_KEYS, field,
               f"is not a layer record with {', '.join(sorted(_LAYER_KEYS))}")
    check.that(row["name"] == want.name, f"{field}.name",
               f"is {_shown(row['name'])}, but the config's model names it {want.name!r}")
    check.that(is_whole_number(row["index"]) and row["index"] == i, f"{field}.index",
               f"is {_shown(row['index'])}, not {i}")
    check.that(row["shape"] == list(want.shape) and all(is_whole_number(n) for n in row["shape"]),
               f"{field}.shape", f"is {_shown(row['shape'])}, but the config's model has "
               f"{list(want.shape)} there")
    check.that(row["searched"] is want.searched, f"{field}.searched",
               f"is {_shown(row['searched'])}, but the config says {want.searched}")
    check.that(is_whole_number(row["n_source"]) and row["n_source"] == want.n_source,
               f"{field}.n_source", f"is {_shown(row['n_source'])}, but the config's source "
               f"has {want.n_source} edges there")
    check.that(is_whole_number(row["n_ticket"]) and 0 <= row["n_ticket"] <= want.n_source,
               f"{field}.n_ticket", f"is {_shown(row['n_ticket'])}, outside 0..{want.n_source}")
    numel = math.prod(want.shape)
    packed = (numel + 7) // 8
    source = _unpack(payload, check.span(row["source"], packed, f"{field}.source"), want.shape)
    mask = _unpack(payload, check.span(row["ticket"], packed, f"{field}.ticket"), want.shape)
    check.that(int(source.sum()) == row["n_source"], f"{field}.source",
               f"holds {int(source.sum())} edges, not the n_source {row['n_source']} it records")
    check.that(int(mask.sum()) == row["n_ticket"], f"{field}.ticket",
               f"holds {int(mask.sum())} edges, not the n_ticket {row['n_ticket']} it records")
    check.that(not bool((mask & ~source).any()), f"{field}.ticket",
               "has edges outside the layer's source mask")
    check.that(want.searched or bool(mask.all()), f"{field}.ticket",
               "of a dense (not searched) layer is not all ones")
    weight = None
    check.that((row["weight"] is not None) == embedded, f"{field}.weight",
               "is missing though embedded_weights is true" if embedded else
               "is present though embedded_weights is false")
    if embedded:
        offset, _ = check.span(row["weight"], 4 * numel, f"{field}.weight")
        weight = _floats(check, payload, offset, numel, f"{field}.weight").view(want.shape)
    return TicketLayer(want.name, i, want.shape, want.searched, source, mask, weight)


def _buffers(check: _Checker, rows: Any, want: dict[str, tuple[int, ...]],
             payload: memoryview) -> dict[str, Tensor]:
    """The stored buffers (BatchNorm statistics), exactly those of the config's model."""
    check.that(isinstance(rows, list) and all(isinstance(r, dict) and {
        "name", "shape", "offset", "length"} <= set(r) for r in rows), "buffers",
        "is not a list of buffer records (name, shape, offset, length)")
    names = [r["name"] for r in rows]
    check.that(sorted(map(str, names)) == sorted(want) and len(set(map(str, names))) == len(
        names) and all(isinstance(n, str) for n in names), "buffers",
        f"names {_shown(names)}, but the config's model has {sorted(want) or 'none'}")
    out = {}
    for r in rows:
        field, shape = f"buffers[{r['name']}]", want[r["name"]]
        check.that(r["shape"] == list(shape), f"{field}.shape",
                   f"is {_shown(r['shape'])}, but the config's model has {list(shape)}")
        numel = math.prod(shape)
        offset, _ = check.span([r["offset"], r["length"]], 4 * numel, field)
        out[r["name"]] = _floats(check, payload, offset, numel, field).view(shape)
    return out


def _floats(check: _Checker, payload: memoryview, offset: int, n: int, field: str) -> Tensor:
    array = np.frombuffer(payload, dtype="<f4", count=n, offset=offset).astype(np.float32)
    check.that(bool(np.isfinite(array).all()), field, "holds a NaN or an infinity")
    return torch.from_numpy(array)


_LAYER_KEYS = frozenset({"name", "index", "shape", "searched", "n_source", "n_ticket",
                         "source", "ticket", "weight"})
_DENSITY_COUNTS = ("n_prunable", "n_source", "n_ticket")
_DENSITY_RATIOS = ("source_density", "ticket_density", "keep")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _shown(value: Any) -> str:
    """A header value for a message: short, whatever a crafted file put there."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
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
                  field, f"is {_shown(span)}, not an [offset, length] pair of integers")
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
        from slt.models import MODELS
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
            f"is {_shown(shape)}, not a list of 1 to 4 sizes in 1..2^31")
        self.that(is_whole_number(classes) and 1 <= classes <= 2 ** 31, "spec.num_classes",
                  f"is {_shown(classes)}, not a count in 1..2^31")
        data_spec = DataSpec(tuple(shape), classes)
        if cfg.model.name not in MODELS or cfg.source.scheme not in (*SCHEMES, "custom"):
            return cfg, data_spec, None
        try:
            layout = network_layout(cfg, data_spec)
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
                      key, f"is {_shown(value)}, not a short version or hash string")
        self.that(isinstance(header["weights_sha256"], str)
                  and _SHA256.fullmatch(header["weights_sha256"]) is not None,
                  "weights_sha256", f"is {_shown(header['weights_sha256'])}, not 64 hex digits")
        if "scorer" in header:
            self.that(isinstance(header["scorer"], str), "scorer", "is not a name")
        metrics = header["metrics"]
        self.that(isinstance(metrics, dict), "metrics", "is not a table of numbers")
        for key, value in metrics.items():
            self.that(is_finite_number(value), f"metrics.{key}",
                      f"is {_shown(value)}, not a finite number")
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
                      f"densities.{key}", f"is {_shown(dens.get(key))}, but the layers hold "
                      f"{counts[key]}")
        for key in _DENSITY_RATIOS:
            self.that(is_finite_number(dens.get(key)) and 0 <= dens[key] <= 1, f"densities.{key}",
                      f"is {_shown(dens.get(key))}, not a fraction")
        dense = dens.get("dense_layers")
        self.that(isinstance(dense, list) and dense == [tl.name for tl in layers
                                                        if not tl.searched],
                  "densities.dense_layers", f"is {_shown(dense)}, not the config's dense layers")


# Config keys that decide the network's layers, source or weights: overriding one makes
# another network than the one the ticket's masks were found in.
_NETWORK_KEYS = ("model.", "source.", "run.seed", "search.scorer", "search.keep",
                 "search.ticket_density", "search.scope")


def network_overrides(ticket: Ticket) -> list[str]:
    """`key=value` of each network-shaping key where the ticket's config (overridden, say by
    `slt eval --set`) differs from the config saved in its header."""
    saved = _flat(from_dict(ticket.header["config"]).to_dict())
    now = _flat(ticket.config.to_dict())
    return [f"{key}={_shown(now.get(key))} (the ticket's: {_shown(saved.get(key))})"
            for key in sorted(set(saved) | set(now))
            if key.startswith(_NETWORK_KEYS) and saved.get(key) != now.get(key)]


def _flat(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{name}.{key}": value for name, body in sections.items()
            for key, value in body.items()}


def _mismatch(ticket: Ticket, what: str, changed: list[str]) -> TicketError:
    """Why `what` (weights, source masks, layers) regenerated from the config differ from
    the ticket's: an override that changed the network; else another torch when the
    versions differ; else, same torch, an altered ticket or a machine drawing otherwise."""
    if changed:
        return TicketError(f"{what} regenerated from the config differ from the ticket's "
                           f"because the override {'; '.join(changed)} changed the network; a "
                           "ticket's masks fit only the network it was found in: evaluate it "
                           "without that override")
    saved, moved = ticket.header["torch"], ("; save the ticket with --embed-weights on the "
                                            "original machine to move it")
    if saved != torch.__version__:
        return TicketError(f"{what} regenerated with torch {torch.__version__} differ from "
                           f"those of the run (torch {saved}){moved}")
    return TicketError(f"{what} regenerated from the ticket's seeds differ from those of the "
                       f"run with the same torch ({saved}): the ticket was altered, or this "
                       f"machine draws other random numbers{moved}")


def rebuild(ticket: Ticket, device: torch.device) -> SltNetwork:
    """The ticket's network, masks fixed, ready to evaluate.

    A ticket with embedded weights uses its stored source masks and weights as they are
    (the portable form). Otherwise weights and sources are regenerated from the seeds and
    checked against the stored masks and weight digest; a mismatch is an error that names
    its cause: an override of the config, another torch, or an altered file.
    """
    from slt.capacity import network_layout
    from slt.network import build_network

    shape, classes = ticket.header["spec"]["shape"], ticket.header["spec"]["num_classes"]
    spec = DataSpec(tuple(shape), classes)
    changed = network_overrides(ticket)
    if changed:  # checked on the meta device: an override may ask for any size
        layout = network_layout(ticket.config, spec)
        now = [(r.name, r.shape, r.searched) for r in layout.layers]
        if now != [(tl.name, tl.shape, tl.searched) for tl in ticket.layers]:
            raise _mismatch(ticket, "the network's layers", changed)
    net = build_network(ticket.config, spec)
    layers = net.all_layers
    if len(layers) != len(ticket.layers):
        raise _mismatch(ticket, "the network's layers", changed)
    if ticket.header["embedded_weights"]:
        for layer, tl in zip(layers, ticket.layers):
            layer.set_source(tl.weight, tl.source_mask, tl.searched)
            if tl.searched:
                layer.scores = torch.nn.Parameter(torch.zeros(layer.n_source))
    else:
        for layer, tl in zip(layers, ticket.layers):
            if not torch.equal(layer.source_mask(), tl.source_mask):
                raise _mismatch(ticket, f"source masks (first at layer {tl.name})", changed)
        if weights_digest(net) != ticket.header["weights_sha256"]:
            raise _mismatch(ticket, "weights", changed)
    state = net.body.state_dict()
    for name, value in ticket.buffers.items():
        state[name] = value.to(state[name].dtype)
    net.body.load_state_dict(state, strict=False)
    net = net.to(device)
    try:
        net.fix_masks(ticket.compact_masks())
    except ValueError:  # the override changed the budget or the source edges
        raise _mismatch(ticket, "the network's source edges", changed) from None
    return net


def embed_weights(path: str | os.PathLike[str]) -> None:
    """Rewrite a ticket file in the portable form, with its weights stored."""
    ticket = load(path)
    if ticket.header["embedded_weights"]:
        return
    net = rebuild(ticket, torch.device("cpu"))
    shape, classes = ticket.header["spec"]["shape"], ticket.header["spec"]["num_classes"]
    save(path, ticket.config, DataSpec(tuple(shape), classes), net, ticket.compact_masks(),
         metrics=ticket.metrics, embed_weights=True)
