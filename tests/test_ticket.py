"""Ticket files: round trip, subset and counts, checksum, weight digest, embedded weights."""

from __future__ import annotations

import pytest
import torch

from slt import config, ticket
from slt.data import Batches, load_data
from slt.errors import TicketError
from slt.search import evaluate, run_search


def quiet(_: str) -> None:
    pass


@pytest.fixture
def finished(tmp_path, tiny_overrides):
    cfg = config.load(None, [*tiny_overrides, "source.scheme=erk"])
    return cfg, run_search(cfg, tmp_path, log=quiet)


def test_round_trip_subset_and_counts(finished) -> None:
    cfg, result = finished
    t = ticket.load(result.run_dir / "ticket.slt")
    assert t.config == cfg
    for layer in t.layers:
        assert layer.mask.dtype == torch.bool and layer.mask.shape == layer.source_mask.shape
        assert bool((layer.mask <= layer.source_mask).all())
    n_prunable = sum(layer.mask.numel() for layer in t.layers)
    assert sum(layer.n_source for layer in t.layers) == round(0.5 * n_prunable)
    assert sum(layer.n_ticket for layer in t.layers) == round(0.25 * n_prunable)
    assert t.header["densities"]["n_ticket"] == result.summary["n_ticket"]


def test_rebuilt_ticket_reproduces_the_accuracy(finished) -> None:
    cfg, result = finished
    t = ticket.load(result.run_dir / "ticket.slt")
    splits = load_data(cfg.data)
    net = ticket.rebuild(t, splits.spec, torch.device("cpu"))
    _, acc = evaluate(net, Batches(splits, torch.device("cpu")), 1000)
    assert acc == result.summary["final_test_acc"]


def test_corruption_is_detected(finished, tmp_path) -> None:
    _, result = finished
    raw = bytearray((result.run_dir / "ticket.slt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad = tmp_path / "bad.slt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(TicketError, match="checksum mismatch"):
        ticket.load(bad)
    (tmp_path / "not.slt").write_bytes(b"hello world, not a ticket at all, no no no no")
    with pytest.raises(TicketError, match="not an slt ticket"):
        ticket.load(tmp_path / "not.slt")


def _resave(t: ticket.Ticket, path, weights_sha: str) -> None:
    """Rewrite a ticket with another weight digest (as a different torch would produce)."""
    import hashlib
    import json
    import struct

    raw = (t.header, path.read_bytes())
    header, data = raw
    start = len(ticket.MAGIC) + 8
    (n,) = struct.unpack("<Q", data[len(ticket.MAGIC):start])
    header = dict(header, weights_sha256=weights_sha)
    head = json.dumps(header).encode()
    body = ticket.MAGIC + struct.pack("<Q", len(head)) + head + data[start + n:-32]
    path.write_bytes(body + hashlib.sha256(body).digest())


def test_weight_mismatch_needs_embedded_weights(tmp_path, tiny_overrides) -> None:
    cfg = config.load(None, tiny_overrides)
    plain = run_search(cfg, tmp_path / "p", log=quiet)
    embedded = run_search(cfg, tmp_path / "e", embed_weights=True, log=quiet)
    splits = load_data(cfg.data)
    for result, ok in ((plain, False), (embedded, True)):
        path = result.run_dir / "ticket.slt"
        t = ticket.load(path)
        _resave(t, path, "0" * 64)
        t = ticket.load(path)
        if not ok:
            with pytest.raises(TicketError, match="--embed-weights"):
                ticket.rebuild(t, splits.spec, torch.device("cpu"))
        else:
            net = ticket.rebuild(t, splits.spec, torch.device("cpu"))
            _, acc = evaluate(net, Batches(splits, torch.device("cpu")), 1000)
            assert acc == result.summary["final_test_acc"]
    assert (embedded.run_dir / "ticket.slt").stat().st_size > (
        plain.run_dir / "ticket.slt").stat().st_size
