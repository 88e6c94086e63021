"""The report: overlap/survival on hand-made masks, tables on hand-made run directories,
and survival on a real tiny sweep checked against the ticket files themselves."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import struct
from pathlib import Path

import pytest
import torch

from slt import ticket
from slt.analysis import fmt_pct, jaccard, mean_std, surviving, surviving_fraction
from slt.cli import main
from slt.config.checks import from_dict
from slt.config.ids import config_hash, run_id
from slt.config.toml import read_toml, to_toml
from slt.data.datasets import load_data
from slt.data.memory import Batches
from slt.engine.measure import evaluate
from slt.errors import SltError
from slt.reporting.runs import load_runs
from slt.reporting.write import write_report
from slt.resolve import load, resolve
from slt.sweeps.grid import load_sweep
from slt.sweeps.local import run_sweep
from slt.ticket import MAGIC
from tests.conftest import TINY


def masks(*rows: list[int]) -> list[torch.Tensor]:
    return [torch.tensor(r, dtype=torch.bool) for r in rows]


def test_overlap_and_survival_on_hand_made_masks() -> None:
    a = masks([1, 1, 0, 0], [1, 0])
    b = masks([0, 1, 1, 0], [1, 1])
    # intersection: 1 + 1 = 2; union: 3 + 2 = 5
    assert jaccard(a, b) == pytest.approx(2 / 5)
    assert jaccard(a, a) == 1.0 and jaccard(masks([0, 0]), masks([0, 0])) == 1.0
    source = masks([0, 1, 1, 1], [1, 1])
    assert [m.tolist() for m in surviving(a, source)] == [[False, True, False, False],
                                                          [True, False]]
    assert surviving_fraction(a, source) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="equal shapes"):
        jaccard(a, masks([1, 1, 0], [1, 0]))


def test_statistics() -> None:
    assert mean_std([0.9, 0.8]) == pytest.approx((0.85, math.sqrt(0.005)))
    assert mean_std([0.5]) == (0.5, 0.0)
    assert fmt_pct([0.9, 0.8]) == "85.00 ± 7.07 (2)"
    assert fmt_pct([0.5]) == "50.00" and fmt_pct([]) == "–"


def fake_run(root: Path, overrides: list[str], acc: float | None, status: str = "finished"
             ) -> Path:
    """A run directory as `slt search` leaves it, without running anything."""
    ticket_size = ("search.keep=", "search.ticket_density=")
    if any(o.startswith(ticket_size) for o in overrides):  # one spelling of it on one line
        base = [o for o in TINY if not o.startswith(ticket_size)]
    else:
        base = TINY
    cfg = load(None, [*base, *overrides])
    run_dir = root / run_id(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    if status == "finished":
        # not a usable ticket, but an intact file of this config: the run finished
        head = json.dumps({"config_hash": config_hash(cfg)}).encode()
        body = MAGIC + struct.pack("<Q", len(head)) + head
        (run_dir / "ticket.slt").write_bytes(body + hashlib.sha256(body).digest())
        (run_dir / "summary.json").write_text(json.dumps({
            "config_hash": config_hash(cfg), "final_test_acc": acc, "best_test_acc": acc,
            "epochs": cfg.search.epochs,
            "time_s": 1.0, "source_density": cfg.source.density,
            "layers": [{"name": "0", "shape": [cfg.model.hidden[0], cfg.data.input_dim],
                        "source_density": cfg.source.density}]}))
    elif status == "running":
        (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": acc}) + "\n")
    else:
        (run_dir / "error.json").write_text(json.dumps({"error": "DataError: no data"}))
    return run_dir


def test_tables_have_the_right_numbers(tmp_path) -> None:
    runs = tmp_path / "runs"
    t = "search.ticket_density=0.05"
    for seed, accs in ((0, (0.90, 0.80, 0.60)), (1, (0.80, 0.70, 0.40))):
        for d, acc in zip((1.0, 0.5, 0.1), accs):
            fake_run(runs, [t, f"source.density={d}", f"run.seed={seed}"], acc)
    fake_run(runs, [t, "source.density=0.2", "run.seed=0"], 0.5, status="running")
    failed = fake_run(runs, [t, "source.density=0.2", "run.seed=1"], None, status="failed")
    path = write_report(runs, log=lambda _: None)
    text = path.read_text()
    assert "6 run directories" not in text and "8 run directories: 6 finished, 1 running, " \
        "1 failed" in text
    # accuracy vs density: mean ± sample std over the two seeds
    assert "| all runs | 85.00 ± 7.07 (2) | 75.00 ± 7.07 (2) | 50.00 ± 14.14 (2) |" in text
    assert "## Running" in text and "| 1/3 | 50.00 |" in text
    assert f"| {failed.name} | DataError: no data |" in text
    with open(runs / "report" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8
    finished = sorted(float(r["final_test_acc"]) for r in rows if r["status"] == "finished")
    assert finished == [0.4, 0.6, 0.7, 0.8, 0.8, 0.9]
    assert {r["status"] for r in rows} == {"finished", "running", "failed"}


def test_dense_runs_serve_every_scheme(tmp_path) -> None:
    runs = tmp_path / "runs"
    fake_run(runs, ["source.density=1.0", "source.scheme=uniform"], 0.9)
    fake_run(runs, ["source.density=0.5", "source.scheme=uniform"], 0.8)
    fake_run(runs, ["source.density=0.5", "source.scheme=erk"], 0.7)
    text = write_report(runs, log=lambda _: None).read_text()
    assert "| scheme=erk | 90.00 | 70.00 |" in text
    assert "| scheme=uniform | 90.00 | 80.00 |" in text


def test_theory_width_runs_form_one_line(tmp_path) -> None:
    runs = tmp_path / "runs"
    fake_run(runs, ["source.density=1.0"], 0.9)
    fake_run(runs, ["source.density=0.5"], 0.6)
    fake_run(runs, ["source.density=0.5", "model.width=1.4427"], 0.85)  # w(0.5)
    text = write_report(runs, log=lambda _: None).read_text()
    assert "| width=1 | 90.00 | 60.00 |" in text
    assert "| width=theory | 90.00 | 85.00 |" in text
    assert "| all runs | 0.5 | 1.4427 | 60.00 | 85.00* |" in text  # the width study


def test_keep_and_ticket_density_runs_stay_apart(tmp_path) -> None:
    runs = tmp_path / "runs"
    fake_run(runs, ["source.density=1.0", "search.keep=0.5"], 0.9)
    fake_run(runs, ["source.density=0.5", "search.keep=0.5"], 0.8)
    fake_run(runs, ["source.density=1.0", "search.ticket_density=0.05"], 0.6)
    fake_run(runs, ["source.density=0.5", "search.ticket_density=0.05"], 0.7)
    text = write_report(runs, log=lambda _: None).read_text()
    assert "| keep=0.5, t=None | 90.00 | 80.00 |" in text
    assert "| keep=None, t=0.05 | 60.00 | 70.00 |" in text


def test_width_one_is_the_theory_width_where_w_is_one(tmp_path) -> None:
    runs = tmp_path / "runs"
    t = "search.ticket_density=0.1"
    fake_run(runs, [t, "source.density=1.0"], 0.9)
    fake_run(runs, [t, "source.density=0.7"], 0.8)  # w(0.7) = 1: this run is both lines
    fake_run(runs, [t, "source.density=0.2"], 0.5)
    fake_run(runs, [t, "source.density=0.2", "model.width=4.4814"], 0.85)
    text = write_report(runs, log=lambda _: None).read_text()
    assert "| width=theory | 90.00 | 80.00 | 85.00 |" in text
    assert "| width=1 | 90.00 | 80.00 | 50.00 |" in text


def test_profiles_of_different_networks_do_not_mix(tmp_path) -> None:
    runs = tmp_path / "runs"
    for hidden in ("[16, 16]", "[32, 32]"):
        for d in (0.5, 0.2):
            fake_run(runs, [f"model.hidden={hidden}", f"source.density={d}",
                            "search.ticket_density=0.1"], 0.5)
    text = write_report(runs, log=lambda _: None).read_text()
    assert "| 0 (16×8) | 0.500 | 0.200 |" in text and "| 0 (32×8) | 0.500 | 0.200 |" in text


def test_rules_with_options_are_settings(tmp_path) -> None:
    runs = tmp_path / "runs"
    t = "search.ticket_density=0.1"
    fake_run(runs, [t, "source.density=0.5", "search.scorer=iterand",
                    "search.scorer.rate=0.2"], 0.7)
    fake_run(runs, [t, "source.density=0.5", "search.scorer=edge-popup"], 0.6)
    text = write_report(runs, log=lambda _: None).read_text()
    assert "| scorer=edge-popup | 60.00 |" in text
    assert "| scorer=iterand(every=1, rate=0.2) | 70.00 |" in text


def test_report_errors(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no such folder of runs" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no run directories" in capsys.readouterr().err


SWEEP = """
[set]
data.name = "planted_teacher"
data.input_dim = 8
data.num_classes = 3
data.teacher_hidden = 16
data.train_size = 512
data.test_size = 256
model.hidden = [32, 32]
search.epochs = 2
search.batch_size = 64
search.ticket_density = 0.1
[axes]
source.density = [1.0, 0.5, 0.2]
run.seed = [0, 1]
"""


def test_survival_and_overlap_match_the_ticket_files(tmp_path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(SWEEP)
    out = tmp_path / "runs"
    run_sweep(load_sweep(path), out, progress=False, log=lambda _: None)
    text = write_report(out, log=lambda _: None).read_text()
    runs = {(r.config.run.seed, r.density): r for r in load_runs(out)[0]}
    dense = ticket.load(runs[(0, 1.0)].path / "ticket.slt")
    sparse = ticket.load(runs[(0, 0.2)].path / "ticket.slt")
    d_masks = [tl.mask for tl in dense.layers]
    s_sources = [tl.source_mask for tl in sparse.layers]
    # by hand: the dense ticket's edges in the d=0.2 source, and that part evaluated as is
    kept = sum(int((m & s).sum()) for m, s in zip(d_masks, s_sources))
    fraction = kept / sum(int(m.sum()) for m in d_masks)
    net = ticket.rebuild(dense, torch.device("cpu"))
    net.fix_masks([(m & s).reshape(-1) for m, s in zip(d_masks, s_sources)])
    cfg = dense.config
    acc = evaluate(net, Batches(load_data(cfg.data), torch.device("cpu")), 1000)[1]
    cache = json.loads(next(runs[(0, 0.2)].path.glob("survival-*.json")).read_text())
    assert cache["fraction"] == pytest.approx(fraction)
    assert cache["surviving_acc"] == pytest.approx(acc)
    assert cache["jaccard"] == pytest.approx(jaccard(d_masks, [tl.mask for tl in sparse.layers]))
    assert 0.1 < fraction < 0.35  # about d = 0.2 of a ticket chosen without regard to the source
    assert "## Survival as the source thins" in text and "## Ticket overlap" in text
    # the overlap table's d=1 vs d=0.2 cell is the mean over both seeds
    j = [jaccard([tl.mask for tl in ticket.load(runs[(s, 1.0)].path / "ticket.slt").layers],
                 [tl.mask for tl in ticket.load(runs[(s, 0.2)].path / "ticket.slt").layers])
         for s in (0, 1)]
    j5 = [jaccard([tl.mask for tl in ticket.load(runs[(s, 1.0)].path / "ticket.slt").layers],
                  [tl.mask for tl in ticket.load(runs[(s, 0.5)].path / "ticket.slt").layers])
          for s in (0, 1)]
    assert f"| d=1 | 1.000 | {sum(j5) / 2:.3f} | {sum(j) / 2:.3f} |" in text
    # the cache is used while both tickets are unchanged, recomputed when one changes
    cache_path = next(runs[(0, 0.2)].path.glob("survival-*.json"))
    forged = {**cache, "fraction": 0.5}
    cache_path.write_text(json.dumps(forged))
    write_report(out, log=lambda _: None)
    assert json.loads(cache_path.read_text())["fraction"] == 0.5
    cache_path.write_text(json.dumps({**forged, "tickets": ["0" * 64, "0" * 64]}))
    write_report(out, log=lambda _: None)
    assert json.loads(cache_path.read_text())["fraction"] == pytest.approx(fraction)
    for png in ("accuracy_vs_density.png", "survival.png", "layer_densities.png"):
        assert (out / "report" / png).stat().st_size > 10_000
    assert from_dict(dense.config.to_dict()) == dense.config


def test_without_matplotlib_tables_only(tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "slt.reporting.plots", None)  # importing it now fails
    runs = tmp_path / "runs"
    dense = fake_run(runs, ["source.density=1.0"], 0.9)
    sparse = fake_run(runs, ["source.density=0.5"], 0.8)
    notes: list[str] = []
    text = write_report(runs, log=notes.append).read_text()
    # fake_run's tickets hold no layers: the survival tables name them instead of losing
    # them silently
    left_out = "left out of the survival and overlap tables: {}: ticket format None is not " \
        "supported"
    assert notes == ["matplotlib is not installed (pip install 'slt[plot]'): tables only, "
                     "no plots", *(left_out.format(r / "ticket.slt") for r in (dense, sparse))]
    assert "| all runs | 90.00 | 80.00 |" in text and ".png" not in text
    assert not list((runs / "report").glob("*.png"))


def test_a_run_of_a_rule_not_installed_here_is_still_reported(tmp_path) -> None:
    """Reading a run needs only its own resolved config, not the plug-ins it names."""
    runs = tmp_path / "runs"
    run_dir = fake_run(runs, ["source.density=0.5"], 0.8)
    raw = read_toml(run_dir / "config.toml")
    raw["search"]["scorer"] = {"name": "someones-rule", "temperature": 2.0}
    cfg = from_dict(raw)
    with pytest.raises(SltError, match="someones-rule"):
        resolve(raw)  # about to run it: the name must be registered
    moved = runs / run_id(cfg)
    run_dir.rename(moved)
    (moved / "config.toml").write_text(to_toml(cfg))
    summary = json.loads((moved / "summary.json").read_text())
    (moved / "summary.json").write_text(json.dumps({**summary, "config_hash": config_hash(cfg)}))
    head = json.dumps({"config_hash": config_hash(cfg)}).encode()
    body = MAGIC + struct.pack("<Q", len(head)) + head
    (moved / "ticket.slt").write_bytes(body + hashlib.sha256(body).digest())
    text = write_report(runs, evaluate_survival=False, log=lambda _: None).read_text()
    assert "1 run directories: 1 finished" in text
    assert "search.scorer=someones-rule(temperature=2.0)" in text


def test_effective_density_of_an_older_run_is_measured_on_its_ticket(tmp_path) -> None:
    """A run of an older slt has no effective density in its summary: the report measures
    it on the rebuilt ticket (the figure the run would have recorded), caches it in the run
    directory, and does without it under --no-eval."""
    path = tmp_path / "s.toml"
    path.write_text(SWEEP.replace("[0.0, 0.5, 0.2]", "[1.0, 0.2]"))
    out = tmp_path / "runs"
    run_sweep(load_sweep(path), out, progress=False, log=lambda _: None)
    text = write_report(out, log=lambda _: None).read_text()
    assert "## Effective vs nominal ticket density" in text
    table = text.split("## Effective vs nominal ticket density")[1].split("\n## ")[0]
    old = {}
    for run in out.glob("planted_teacher-*"):
        summary = json.loads((run / "summary.json").read_text())
        old[run.name] = summary.pop("effective_density"), summary.pop("effective")
        (run / "summary.json").write_text(json.dumps(summary))
    assert write_report(out, log=lambda _: None, evaluate_survival=False).read_text().count(
        "## Effective vs nominal") == 0
    again = write_report(out, log=lambda _: None).read_text()
    assert again.split("## Effective vs nominal ticket density")[1].split("\n## ")[0] == table
    for name, (density, records) in old.items():
        cache = json.loads((out / name / "effective.json").read_text())
        assert cache["effective_density"] == density
        assert cache["ticket_density"] == records["ticket"]["nominal_density"]
