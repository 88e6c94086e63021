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
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from slt.config.checks import from_dict, is_reference
from slt.config.ids import config_hash
from slt.config.schema import Config
from slt.errors import TicketError, VersionWarning, first_line
from slt.fileio import atomic_write_bytes
from slt.models import library_versions, model_known
from slt.rundir import MAGIC, is_whole_number
from slt.spec import DataSpec
from slt.ticket_format import (
    FORMAT_VERSION,
    LAYER_KEYS,
    HeaderChecker,
    TicketLayer,
    declared_layout,
    read_floats,
    read_header,
    shown,
    unpack_mask,
)

if TYPE_CHECKING:
    from slt.capacity import LayerLayout
    from slt.network import SltNetwork


@dataclass
class Ticket:
    config: Config
    header: dict[str, Any]
    layers: list[TicketLayer]
    buffers: dict[str, Tensor] = field(default_factory=dict)
    path: Path | None = None  # the file it was read from: an export never overwrites it
    trust_model: bool = False  # rebuild a python: model reference (imports its code)

    @property
    def metrics(self) -> dict[str, float]:
        return self.header.get("metrics", {})

    def to_module(self, device: str | torch.device = "cpu",
                  trust_model: bool = False) -> torch.nn.Module:
        """The ticket as a plain module: standard torch layers for a built-in model, the
        user's own class for a model reference (see slt.export.to_module)."""
        from slt.export import to_module

        return to_module(self, device, trust_model)

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
    if is_reference(cfg.model.name):  # another version may lay the model out otherwise
        header["libraries"] = {"torch": torch.__version__,
                               **library_versions(cfg.model.name)}
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


def _parse(body: bytes, path: Path) -> Ticket:
    header, payload = read_header(body, path)
    check = HeaderChecker(path, len(payload))
    cfg, spec, layout = check.network(header)
    embedded = header["embedded_weights"]
    check.that(isinstance(embedded, bool), "embedded_weights", "is not true or false")
    rows = header["layers"]
    if layout is None:  # a plug-in's model or scheme, not installed here: the header's own
        layout = declared_layout(check, rows, header["buffers"])
    check.that(isinstance(rows, list) and len(rows) == len(layout.layers), "layers",
               f"must list the {len(layout.layers)} prunable layers of the config's model "
               f"{cfg.model.name}")
    layers = [_layer(check, i, row, want, payload, embedded)
              for i, (row, want) in enumerate(zip(rows, layout.layers))]
    buffers = _buffers(check, header["buffers"], layout.buffers, payload)
    check.header_values(header, layers)
    return Ticket(cfg, header, layers, buffers, path)


def _layer(check: HeaderChecker, i: int, row: Any, want: LayerLayout, payload: memoryview,
           embedded: bool) -> TicketLayer:
    """Layer `i` of the header checked against the config's, then its masks read."""
    field = f"layers[{i}]"
    check.that(isinstance(row, dict) and set(row) >= LAYER_KEYS, field,
               f"is not a layer record with {', '.join(sorted(LAYER_KEYS))}")
    check.that(row["name"] == want.name, f"{field}.name",
               f"is {shown(row['name'])}, but the config's model names it {want.name!r}")
    check.that(is_whole_number(row["index"]) and row["index"] == i, f"{field}.index",
               f"is {shown(row['index'])}, not {i}")
    check.that(row["shape"] == list(want.shape) and all(is_whole_number(n) for n in row["shape"]),
               f"{field}.shape", f"is {shown(row['shape'])}, but the config's model has "
               f"{list(want.shape)} there")
    check.that(row["searched"] is want.searched, f"{field}.searched",
               f"is {shown(row['searched'])}, but the config says {want.searched}")
    check.that(is_whole_number(row["n_source"]) and row["n_source"] == want.n_source,
               f"{field}.n_source", f"is {shown(row['n_source'])}, but the config's source "
               f"has {want.n_source} edges there")
    check.that(is_whole_number(row["n_ticket"]) and 0 <= row["n_ticket"] <= want.n_source,
               f"{field}.n_ticket", f"is {shown(row['n_ticket'])}, outside 0..{want.n_source}")
    numel = math.prod(want.shape)
    packed = (numel + 7) // 8
    source = unpack_mask(payload, check.span(row["source"], packed, f"{field}.source"), want.shape)
    mask = unpack_mask(payload, check.span(row["ticket"], packed, f"{field}.ticket"), want.shape)
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
        weight = read_floats(check, payload, offset, numel, f"{field}.weight").view(want.shape)
    return TicketLayer(want.name, i, want.shape, want.searched, source, mask, weight)


def _buffers(check: HeaderChecker, rows: Any, want: dict[str, tuple[int, ...]],
             payload: memoryview) -> dict[str, Tensor]:
    """The stored buffers (BatchNorm statistics), exactly those of the config's model."""
    check.that(isinstance(rows, list) and all(isinstance(r, dict) and {
        "name", "shape", "offset", "length"} <= set(r) for r in rows), "buffers",
        "is not a list of buffer records (name, shape, offset, length)")
    names = [r["name"] for r in rows]
    check.that(sorted(map(str, names)) == sorted(want) and len(set(map(str, names))) == len(
        names) and all(isinstance(n, str) for n in names), "buffers",
        f"names {shown(names)}, but the config's model has {sorted(want) or 'none'}")
    out = {}
    for r in rows:
        field, shape = f"buffers[{r['name']}]", want[r["name"]]
        check.that(r["shape"] == list(shape), f"{field}.shape",
                   f"is {shown(r['shape'])}, but the config's model has {list(shape)}")
        numel = math.prod(shape)
        offset, _ = check.span([r["offset"], r["length"]], 4 * numel, field)
        out[r["name"]] = read_floats(check, payload, offset, numel, field).view(shape)
    return out


# Config keys that decide the network's layers, source or weights: overriding one makes
# another network than the one the ticket's masks were found in.
_NETWORK_KEYS = ("model.", "source.", "run.seed", "search.scorer", "search.keep",
                 "search.ticket_density", "search.scope")


def network_overrides(ticket: Ticket) -> list[str]:
    """`key=value` of each network-shaping key where the ticket's config (overridden, say by
    `slt eval --set`) differs from the config saved in its header."""
    saved = _flat(from_dict(ticket.header["config"]).to_dict())
    now = _flat(ticket.config.to_dict())
    return [f"{key}={shown(now.get(key))} (the ticket's: {shown(saved.get(key))})"
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


def rebuild(ticket: Ticket, device: torch.device, trust_model: bool = False) -> SltNetwork:
    """The ticket's network, masks fixed, ready to evaluate.

    A ticket whose model is a `python:` reference names code to import and run: it is
    rebuilt only with `trust_model` (a ConfigError line otherwise). A torchvision or timm
    model rebuilt under another library version than the ticket's is a VersionWarning.

    A ticket with embedded weights uses its stored source masks and weights as they are
    (the portable form). Otherwise weights and sources are regenerated from the seeds and
    checked against the stored masks and weight digest; a mismatch is an error that names
    its cause: an override of the config, another torch, or an altered file.
    """
    from slt.capacity import network_layout
    from slt.network import build_network

    model_known(ticket.config.model.name, trusted=trust_model or ticket.trust_model)
    warn_versions(ticket)
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


def warn_versions(ticket: Ticket) -> None:
    """A VersionWarning naming each library whose version differs from the ticket's."""
    saved = ticket.header.get("libraries")
    if not isinstance(saved, dict) or not is_reference(ticket.config.model.name):
        return
    now = {"torch": torch.__version__, **library_versions(ticket.config.model.name)}
    differ = [f"{lib} {now.get(lib, 'absent')} (the ticket's: {ver})"
              for lib, ver in sorted(saved.items()) if now.get(lib) != ver]
    if differ:
        warnings.warn_explicit(
            f"ticket {ticket.path or ''} was found with other library versions: "
            f"{'; '.join(differ)}; the model may be laid out or compute differently",
            VersionWarning, filename="slt", lineno=0, module="slt.ticket")


def embed_weights(path: str | os.PathLike[str], trust_model: bool = False) -> None:
    """Rewrite a ticket file in the portable form, with its weights stored."""
    ticket = load(path)
    if ticket.header["embedded_weights"]:
        return
    net = rebuild(ticket, torch.device("cpu"), trust_model)
    shape, classes = ticket.header["spec"]["shape"], ticket.header["spec"]["num_classes"]
    save(path, ticket.config, DataSpec(tuple(shape), classes), net, ticket.compact_masks(),
         metrics=ticket.metrics, embed_weights=True)
