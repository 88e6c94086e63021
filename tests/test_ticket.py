"""Ticket files: round trip, subset and counts, checksum, weight digest, embedded weights."""

from __future__ import annotations

import pytest
import torch

from slt import resolve, ticket
from slt.data.datasets import load_data
from slt.data.memory import Batches
from slt.engine.measure import evaluate
from slt.engine.run import run_search
from slt.errors import TicketError


def quiet(_: str) -> None:
    pass


@pytest.fixture
def finished(tmp_path, tiny_overrides):
    cfg = resolve.load(None, [*tiny_overrides, "source.scheme=erk"])
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
    net = ticket.rebuild(t, torch.device("cpu"))
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


def _other_torch(monkeypatch) -> None:
    """Pretend this torch draws different random numbers: other weights, other masks."""
    import slt.network as network

    real_init, real_mask = network.init_weight, network.nested_mask
    monkeypatch.setattr(network, "init_weight", lambda *a, **k: -real_init(*a, **k))
    monkeypatch.setattr(network, "nested_mask",
                        lambda shape, count, seed, index, *forced: real_mask(
                            shape, count, seed + 99, index, *forced))


def _accuracy(path, cfg) -> float:
    splits = load_data(cfg.data)
    net = ticket.rebuild(ticket.load(path), torch.device("cpu"))
    return evaluate(net, Batches(splits, torch.device("cpu")), 1000)[1]


def test_other_torch_needs_embedded_weights(tmp_path, tiny_overrides, monkeypatch) -> None:
    cfg = resolve.load(None, tiny_overrides)
    plain = run_search(cfg, tmp_path / "p", log=quiet)
    embedded = run_search(cfg, tmp_path / "e", embed_weights=True, log=quiet)
    plain_path, embedded_path = plain.run_dir / "ticket.slt", embedded.run_dir / "ticket.slt"
    assert embedded_path.stat().st_size > plain_path.stat().st_size
    with monkeypatch.context() as m:
        _other_torch(m)
        with pytest.raises(TicketError, match="--embed-weights"):
            _accuracy(plain_path, cfg)
        assert _accuracy(embedded_path, cfg) == embedded.summary["final_test_acc"]
    # weights alone differing is caught by the digest
    with monkeypatch.context() as m:
        import slt.network as network

        real = network.init_weight
        m.setattr(network, "init_weight", lambda *a, **k: real(*a, **k) * 1.5)
        with pytest.raises(TicketError, match="weights regenerated"):
            _accuracy(plain_path, cfg)
    # a finished run's ticket can be made portable afterwards
    again = run_search(cfg, tmp_path / "p", embed_weights=True, log=quiet)
    assert again.status == "skipped"
    assert ticket.load(plain_path).header["embedded_weights"] is True
    with monkeypatch.context() as m:
        _other_torch(m)
        assert _accuracy(plain_path, cfg) == plain.summary["final_test_acc"]
