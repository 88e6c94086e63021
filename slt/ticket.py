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
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from slt.config import Config, config_hash, from_dict
from slt.errors import TicketError
from slt.fileio import atomic_write_bytes
from slt.rundir import MAGIC
from slt.spec import DataSpec

if TYPE_CHECKING:
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


def _unpack(data: bytes, shape: tuple[int, ...]) -> Tensor:
    n = int(np.prod(shape))
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n).astype(bool)
    return torch.from_numpy(bits).view(shape)


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
    """Read and verify a ticket file."""
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
    except (ValueError, KeyError, TypeError, IndexError, struct.error, RuntimeError) as exc:
        # the checksum holds, so this file was written this way: not slt's, or a bug
        raise TicketError(f"{path}: not a ticket this slt can read "
                          f"({type(exc).__name__}: {exc})") from None


def _parse(body: bytes, path: Path) -> Ticket:
    (head_len,) = struct.unpack("<Q", body[len(MAGIC):len(MAGIC) + 8])
    start = len(MAGIC) + 8
    header = json.loads(body[start:start + head_len].decode("utf-8"))
    if not isinstance(header, dict):
        raise TicketError(f"{path}: the ticket header is not a JSON object")
    if header.get("format") != FORMAT_VERSION:
        raise TicketError(f"{path}: ticket format {header.get('format')} is not supported")
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing or not {"shape", "num_classes"} <= set(header["spec"]):
        raise TicketError(f"{path}: the ticket header lacks "
                          f"{', '.join(missing) or 'spec.shape or spec.num_classes'}; the file "
                          "was not written by slt (or by an incompatible version)")
    payload = memoryview(body)[start + head_len:]

    def get(span: list[int]) -> bytes:
        return bytes(payload[span[0]:span[0] + span[1]])

    layers = []
    for row in header["layers"]:
        shape = tuple(row["shape"])
        weight = None
        if row["weight"] is not None:
            weight = torch.from_numpy(
                np.frombuffer(get(row["weight"]), dtype=np.float32).copy()).view(shape)
        layers.append(TicketLayer(row["name"], row["index"], shape, row["searched"],
                                  _unpack(get(row["source"]), shape),
                                  _unpack(get(row["ticket"]), shape), weight))
    buffers = {
        row["name"]: torch.from_numpy(np.frombuffer(
            get([row["offset"], row["length"]]), dtype=np.float32).copy()).view(row["shape"])
        for row in header["buffers"]
    }
    return Ticket(from_dict(header["config"], origin=str(path)), header, layers, buffers)


def rebuild(ticket: Ticket, device: torch.device) -> SltNetwork:
    """The ticket's network, masks fixed, ready to evaluate.

    A ticket with embedded weights uses its stored source masks and weights as they are
    (the portable form). Otherwise weights and sources are regenerated from the seeds and
    checked against the stored masks and weight digest; a mismatch is an error.
    """
    from slt.network import build_network

    shape, classes = ticket.header["spec"]["shape"], ticket.header["spec"]["num_classes"]
    net = build_network(ticket.config, DataSpec(tuple(shape), classes))
    layers = net.all_layers
    if len(layers) != len(ticket.layers):
        raise TicketError("the ticket's model has a different number of layers")
    if ticket.header["embedded_weights"]:
        for layer, tl in zip(layers, ticket.layers):
            layer.set_source(tl.weight, tl.source_mask, tl.searched)
            if tl.searched:
                layer.scores = torch.nn.Parameter(torch.zeros(layer.n_source))
    else:
        moved = ("; save the ticket with --embed-weights on the original machine to move it")
        for layer, tl in zip(layers, ticket.layers):
            if not torch.equal(layer.source_mask(), tl.source_mask):
                raise TicketError(f"layer {tl.name}: the regenerated source mask differs from "
                                  f"the ticket's (torch {torch.__version__} vs "
                                  f"{ticket.header['torch']}){moved}")
        if weights_digest(net) != ticket.header["weights_sha256"]:
            raise TicketError(f"weights regenerated with torch {torch.__version__} differ from "
                              f"those of the run (torch {ticket.header['torch']}){moved}")
    state = net.body.state_dict()
    for name, value in ticket.buffers.items():
        state[name] = value.to(state[name].dtype)
    net.body.load_state_dict(state, strict=False)
    net = net.to(device)
    net.fix_masks(ticket.compact_masks())
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
