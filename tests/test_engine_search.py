"""The search loop: learning happens, run directories, skip, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from slt import resolve, ticket
from slt.engine.loop import lr_factor
from slt.engine.run import run_search


def quiet(_: str) -> None:
    pass


def test_lr_schedule_warmup_then_cosine() -> None:
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)


def test_run_directory_contents(tmp_path, tiny_overrides) -> None:
    cfg = resolve.load(None, tiny_overrides)
    result = run_search(cfg, tmp_path, log=quiet)
    assert result.status == "finished"
    files = sorted(p.name for p in result.run_dir.iterdir())
    assert files == [  # .lock: the one-writer lock, kept (see slt.rundir)
        ".lock", "checkpoint.pt", "config.toml", "metrics.jsonl", "summary.json", "ticket.slt"]
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["final_test_acc"] == rows[-1]["test_acc"]
    assert summary["n_ticket"] == round(0.25 * summary["n_prunable"])
    assert summary["source_density"] == pytest.approx(0.5, abs=1e-3)
    assert summary["keep"] == pytest.approx(0.5, abs=1e-3)
    assert resolve.load(result.run_dir / "config.toml") == cfg
    again = run_search(cfg, tmp_path, log=quiet)
    assert again.status == "skipped" and again.summary == summary


def test_search_learns_the_planted_teacher(tmp_path, tiny_overrides) -> None:
    cfg = resolve.load(None, [*tiny_overrides, "search.epochs=8", "data.train_size=2048",
                             "model.hidden=[64, 64]", "model.init=signed_constant"])
    summary = run_search(cfg, tmp_path, log=quiet).summary
    # 3 balanced-ish classes: chance is about 1/3
    assert summary["best_test_acc"] > 0.6


def test_interrupted_run_resumes_to_the_same_ticket(tmp_path, tiny_overrides) -> None:
    cfg = resolve.load(None, [*tiny_overrides, "search.epochs=4", "search.warmup_epochs=1"])
    straight = run_search(cfg, tmp_path / "a", log=quiet)
    first = run_search(cfg, tmp_path / "b", stop_after_epochs=2, log=quiet)
    assert first.status == "stopped" and not (first.run_dir / "ticket.slt").exists()
    # a metrics line written after the last checkpoint must not survive the resume
    with open(first.run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 3, "test_acc": -1}) + "\n")
    resumed = run_search(cfg, tmp_path / "b", log=quiet)
    assert resumed.status == "finished"
    a, b = ticket.load(straight.run_dir / "ticket.slt"), ticket.load(resumed.run_dir / "ticket.slt")
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.mask, lb.mask)
    rows_a = (straight.run_dir / "metrics.jsonl").read_text().splitlines()
    rows_b = (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(r).items() if k != "epoch_time_s"} for r in rows_a]
    assert strip == [{k: v for k, v in json.loads(r).items() if k != "epoch_time_s"}
                     for r in rows_b]


def test_global_scope_run(tmp_path, tiny_overrides) -> None:
    cfg = resolve.load(None, [*tiny_overrides, "search.scope=global"])
    summary = run_search(cfg, tmp_path, log=quiet).summary
    assert summary["n_ticket"] == round(0.25 * summary["n_prunable"])


def test_diverged_scores_are_one_clear_error(tmp_path, tiny_overrides, monkeypatch) -> None:
    from slt.errors import SltError
    from slt.scorers.edge_popup import EdgePopup

    monkeypatch.setattr(EdgePopup, "init_scores",
                        lambda self, layer, gen: torch.full((layer.n_source,), float("nan")))
    cfg = resolve.load(None, tiny_overrides)
    with pytest.raises(SltError, match=r"epoch 1: non-finite score .* lower search.lr"):
        run_search(cfg, tmp_path, log=quiet)


def test_corrupt_checkpoint_is_one_clear_error(tmp_path, tiny_overrides) -> None:
    from slt.errors import SltError

    cfg = resolve.load(None, [*tiny_overrides, "search.epochs=3"])
    first = run_search(cfg, tmp_path, stop_after_epochs=1, log=quiet)
    (first.run_dir / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(SltError, match="checkpoint.pt is unreadable"):
        run_search(cfg, tmp_path, log=quiet)
