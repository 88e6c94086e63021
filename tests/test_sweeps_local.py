"""Sweeps: grid expansion, skipped points, the theory width, resume, failure isolation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from slt import ticket
from slt.analysis import theory_width
from slt.cli import main
from slt.config.checks import from_dict
from slt.config.ids import run_id
from slt.engine.run import run_search
from slt.errors import ConfigError
from slt.sweeps.grid import load_sweep
from slt.sweeps.local import run_sweep

TINY_SET = """
[set]
data.name = "planted_teacher"
data.input_dim = 8
data.num_classes = 3
data.teacher_hidden = 16
data.train_size = 256
data.test_size = 128
model.hidden = [16, 16]
search.epochs = 2
search.batch_size = 64
run.progress = false
"""


def write_sweep(tmp_path: Path, axes: str, extra: str = "") -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(extra + TINY_SET + "[axes]\n" + axes)
    return path


def test_theory_width_formula() -> None:
    assert theory_width(1.0) == 1.0
    assert theory_width(0.5) == pytest.approx(1 / math.log(2))  # 1.4427
    assert theory_width(0.1) == pytest.approx(1 / math.log(1 / 0.9))  # 9.4912
    assert theory_width(0.2) == pytest.approx(4.4814, abs=1e-4)
    assert theory_width(0.7) == 1.0  # 1/ln(1/0.3) = 0.83: the bound asks for no widening
    with pytest.raises(ConfigError, match="density in"):
        theory_width(0.0)


def test_expansion_skips_and_resolves_theory(tmp_path) -> None:
    path = write_sweep(tmp_path, 'source.density = [1.0, 0.5, 0.1]\n'
                       'search.ticket_density = [0.2, 0.05]\nmodel.width = [1, "theory"]\n')
    points = load_sweep(path).points()
    assert len(points) == 12
    # the last axis varies fastest
    assert [p.values["model.width"] for p in points[:2]] == [1, "theory"]
    skipped = [p for p in points if p.config is None]
    assert [(p.values["source.density"], p.values["search.ticket_density"]) for p in skipped] \
        == [(0.1, 0.2), (0.1, 0.2)]
    assert "cannot exceed source.density" in skipped[0].skipped
    widths = {(p.values["source.density"], p.values["model.width"]): p.config.model.width
              for p in points if p.config is not None}
    assert widths[(0.5, "theory")] == pytest.approx(1.4427)
    assert widths[(0.1, "theory")] == pytest.approx(9.4912)
    assert widths[(1.0, "theory")] == 1.0
    assert all(p.config.search.epochs == 2 for p in points if p.config is not None)


def test_base_config_is_relative_to_the_sweep_file(tmp_path) -> None:
    (tmp_path / "base.toml").write_text('[model]\nhidden = [7]\n[search]\nepochs = 4\n')
    path = tmp_path / "s.toml"
    path.write_text('base = "base.toml"\n[axes]\nrun.seed = [0, 1]\n')
    points = load_sweep(path).points()
    assert [(p.config.model.hidden, p.config.search.epochs, p.config.run.seed)
            for p in points] == [((7,), 4, 0), ((7,), 4, 1)]


@pytest.mark.parametrize("text, message", [
    ('[axes]\nsource.densty = [0.5]\n', "unknown key 'source.densty' (did you mean"),
    ('[axes]\nsource.density = 0.5\n', "source.density must be a non-empty list"),
    ('[axes]\nsource.density = []\n', "source.density must be a non-empty list"),
    ('[set]\nsource.density = "theory"\n', "only a value of model.width"),
    ('seeds = [1]\n', "unknown sweep key 'seeds'"),
    ('base = "nowhere.toml"\n', "config file not found: nowhere.toml"),
])
def test_bad_sweep_files(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_sweep(path)


def test_rerun_skips_finished_and_resumes_interrupted(tmp_path) -> None:
    path = write_sweep(tmp_path, "source.density = [1.0, 0.5]\nsearch.ticket_density = [0.25]\n")
    sweep = load_sweep(path)
    out = tmp_path / "runs"
    # interrupt the d=0.5 point after one of its two epochs, as a killed sweep would leave it
    half = next(p.config for p in sweep.points() if p.values["source.density"] == 0.5)
    assert run_search(half, out, stop_after_epochs=1, log=lambda _: None).status == "stopped"
    first = run_sweep(sweep, out, progress=False, log=lambda _: None)
    status = {p.values["source.density"]: s for p, s in first.done}
    assert status == {1.0: "finished", 0.5: "finished"}
    lines = (out / run_id(half) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # resumed, not restarted
    # the resumed run found the ticket an uninterrupted run finds
    fresh = run_search(half, tmp_path / "fresh", log=lambda _: None)
    a = ticket.load(out / run_id(half) / "ticket.slt")
    b = ticket.load(fresh.run_dir / "ticket.slt")
    assert all(torch.equal(x.mask, y.mask) for x, y in zip(a.layers, b.layers))
    again = run_sweep(sweep, out, progress=False, log=lambda _: None)
    assert sorted(s for _, s in again.done) == ["skipped", "skipped"]
    manifest = json.loads((out / "sweep-sweep.json").read_text())
    assert sorted(p["status"] for p in manifest["points"]) == ["skipped", "skipped"]


def test_points_with_one_run_id_run_once(tmp_path) -> None:
    # at d = 1 every scheme is the same dense source, and the theory width is 1
    path = write_sweep(tmp_path, 'source.density = [1.0]\nsearch.ticket_density = [0.25]\n'
                       'source.scheme = ["uniform", "erk"]\nmodel.width = [1, "theory"]\n')
    outcome = run_sweep(load_sweep(path), tmp_path / "runs", progress=False, log=lambda _: None)
    assert len(outcome.done) == 1
    assert len([p for p in (tmp_path / "runs").iterdir() if p.is_dir()]) == 1
    manifest = json.loads((tmp_path / "runs" / "sweep-sweep.json").read_text())["points"]
    assert len(manifest) == 4 and len({p["run_id"] for p in manifest}) == 1
    assert {p["status"] for p in manifest} == {"finished"}


@pytest.mark.slow
def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, capsys) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    path = write_sweep(tmp_path, 'data.name = ["planted_teacher", "mnist"]\n'
                       "source.density = [1.0, 0.5]\n")
    path.write_text(path.read_text().replace("[set]\n", f'[set]\ndata.root = "{empty}"\n'))
    out = tmp_path / "runs"
    # two worker processes: a failure inside one must not stop the other
    code = main(["sweep", str(path), "--out", str(out), "--workers", "2", "--no-progress"])
    assert code == 1  # some point failed
    assert "2 runs done, 2 failed, 0 points skipped" in capsys.readouterr().out
    failed = [p for p in out.iterdir() if (p / "error.json").is_file()]
    assert len(failed) == 2 and all(p.name.startswith("mnist-") for p in failed)
    assert json.loads((failed[0] / "error.json").read_text())["error"].startswith(
        "dataset mnist not found in ")
    done = [p for p in out.iterdir() if (p / "summary.json").is_file()]
    assert len(done) == 2 and all(p.name.startswith("planted_teacher-") for p in done)
    report = (out / "report" / "report.md").read_text()
    assert "## Failed" in report and failed[0].name in report


def crash_at_half(cfg, out_root):  # module level: worker processes import it
    import os

    from slt.sweeps.point import run_point

    if cfg.source.density == 0.5 and cfg.run.seed == 0:
        os._exit(3)  # the worker dies, as one killed for memory would
    return run_point(cfg, out_root)


@pytest.mark.slow
def test_a_dying_worker_fails_its_point_only(tmp_path) -> None:
    path = write_sweep(tmp_path, "source.density = [0.5, 1.0]\nrun.seed = [0, 1, 2]\n")
    outcome = run_sweep(load_sweep(path), tmp_path / "runs", workers=2, progress=False,
                        log=lambda _: None, runner=crash_at_half)
    failed = {(p.values["source.density"], p.values["run.seed"]): e for p, e in outcome.failed}
    assert failed == {(0.5, 0): "the worker process running it died (exit code 3)"}
    point = next(p for p, _ in outcome.failed)
    error = json.loads((tmp_path / "runs" / run_id(point.config) / "error.json").read_text())
    assert error["error"] == "the worker process running it died (exit code 3)"
    # only the point whose worker died failed: the one running beside it finished
    assert len(outcome.done) == 5 and {s for _, s in outcome.done} == {"finished"}


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[axes]\nsource.density = [0.5]\nsearch.keep = [2.0]\n")
    out = tmp_path / "runs"
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("slt: error: no point of") and "search.keep must be in (0, 1]" \
        in err[-1]
    assert not out.exists()  # nothing written
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2
    assert capsys.readouterr().err.strip() == "slt: error: config file not found: " \
        f"{tmp_path / 'missing.toml'}"
    assert main(["sweep", str(path), "--workers", "0"]) == 2
    assert main(["sweep", str(path), "--set", "source.densty=0.5"]) == 2
    assert "unknown key 'source.densty'" in capsys.readouterr().err


def test_from_dict_round_trip_of_a_point(tmp_path) -> None:
    path = write_sweep(tmp_path, "run.seed = [3]\n")
    point = load_sweep(path).points()[0]
    assert from_dict(point.config.to_dict()) == point.config


def test_the_offline_demo_is_the_packaged_density_sweep() -> None:
    from slt.cli import default_argv

    argv = default_argv()
    assert argv[:2] == ["sweep", "demo_sweep.toml"] and "--out" in argv
    points = load_sweep(argv[1]).points()  # found among the packaged configs
    assert len(points) == 24 and all(p.config is not None for p in points)
    assert {p.config.data.name for p in points} == {"planted_teacher"}
    assert {p.config.search.keep for p in points} == {0.5}
    widths = sorted({(p.config.source.density, p.config.model.width) for p in points})
    assert widths == [(0.1, 1.0), (0.1, 9.4912), (0.2, 1.0), (0.2, 4.4814), (0.5, 1.0),
                      (0.5, 1.4427), (1.0, 1.0)]
    assert len({run_id(p.config) for p in points}) == 21  # d = 1 at width 1 and "theory"


def test_the_demo_runs_its_longest_points_first(tmp_path) -> None:
    """The theory-width points at the lowest density are the widest networks: run last,
    they left one worker running them alone at the end (issue 21, item 5)."""
    from slt.network import count_weights
    from slt.overview import known_spec
    from slt.sweeps.grid import cost, plan

    _, unique = plan(load_sweep("demo_sweep.toml"), tmp_path, {}, 1, lambda _: None)
    points = list(unique.values())
    costs = [cost(p.config) for p in points]
    assert all(a >= b for a, b in zip(costs, costs[1:])), costs
    assert [p.values["source.density"] for p in points[:3]] == [0.1] * 3
    assert {p.values["model.width"] for p in points[:9]} == {"theory"}
    assert [p.values["run.seed"] for p in points[:3]] == [0, 1, 2]  # ties: the file's order
    first = points[0].config
    assert costs[0] == count_weights(first, known_spec(first.data)).n_prunable * 5
    assert costs[0] > 50 * costs[-1]  # width 9.5 against width 1


def test_runs_of_unknown_length_keep_the_files_order(tmp_path) -> None:
    sweep = tmp_path / "s.toml"
    sweep.write_text('base = "quick.toml"\n[set]\ndata.name = "imagefolder"\n'
                     f'data.root = "{tmp_path}"\n[axes]\nmodel.width = [1, 4]\n')
    from slt.sweeps.grid import plan

    _, unique = plan(load_sweep(sweep), tmp_path / "out", {}, 1, lambda _: None)
    assert [p.values["model.width"] for p in unique.values()] == [1, 4]
