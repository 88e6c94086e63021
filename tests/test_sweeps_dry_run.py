"""`slt sweep FILE --dry-run`: every run in the order it would start, its state in --out and
its estimated time (ms/step from a bench file, or timed here), the totals; nothing written.
Also the packaged seed-paper grid (configs/sweep_seed_paper_cifar10.toml) and its CPU proxy."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slt.cli import main
from slt.config.ids import run_id
from slt.config.toml import toml_value
from slt.sweeps.dryrun import dry_run, duration, pool_wall
from slt.sweeps.estimate import steps_per_epoch
from slt.sweeps.grid import cost, load_sweep, runs
from slt.sweeps.local import run_sweep
from slt.sweeps.point import write_error
from tests.test_sweeps_local import TINY_SET

SEED = "sweep_seed_paper_cifar10.toml"
PROXY = "sweep_seed_paper_proxy.toml"
AXES = {"model.name": ["resnet18", "vgg16"], "source.density": [0.5, 0.3, 0.2],
        "search.ticket_density": [0.2, 0.1, 0.05, 0.01]}
MS = {"resnet18": 20.0, "vgg16": 10.0}  # the hand-written bench file's ms/step


def bench_file(tmp_path: Path, rows: list[dict], **extra: object) -> Path:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"torch": "test", "device": "cuda", "device_name": "by hand",
                                "source_density": 1.0, "keep": 0.5, "overrides": [],
                                **extra, "rows": rows}))
    return path


def seed_bench(tmp_path: Path) -> Path:
    return bench_file(tmp_path, [{"model": m, "input": "3x32x32", "batch": 128, "mode": "fp32",
                                  "search_ms": ms} for m, ms in MS.items()])


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*"))}


def test_seed_grid_expands_to_valid_points_with_the_papers_settings() -> None:
    sweep = load_sweep(SEED)
    assert sweep.axes == {**AXES, "run.seed": [0, 1, 2]}
    points = sweep.points()
    assert len(points) == 2 * 3 * 4 * 3
    assert [p.skipped for p in points if p.config is None] == []  # every point passes checks
    for p in points:
        cfg = p.config
        assert cost(cfg) is not None  # its network lays out (the plan's length estimate)
        assert cfg.ticket_density <= cfg.source.density
        assert (cfg.data.name, cfg.data.augment, cfg.source.scheme, cfg.search.scope) == \
            ("cifar10", False, "uniform", "layer")
        assert (cfg.search.epochs, cfg.search.lr, cfg.search.momentum,
                cfg.search.weight_decay, cfg.search.batch_size) == (100, 0.1, 0.9, 5e-4, 128)
        assert (cfg.model.init, cfg.model.init_scale, cfg.model.bn_affine,
                cfg.model.width) == ("kaiming_normal", "none", False, 1.0)
    # t = 0.2 at d = 0.2 stays a run: keep 1.0, the whole source (see the file's header)
    whole = [p for p in points if p.config.keep == pytest.approx(1.0)]
    assert len(whole) == 2 * 3
    outcome, unique = runs(sweep, {}, 1, lambda _: None)
    assert len(unique) == 72 and outcome.skipped == []


def config_id_args(path: str, values: dict) -> list[str]:
    """`slt config id` for one point: the sweep's [set] and the point's axis values."""
    sweep = load_sweep(path)
    items = [f"{k}={toml_value(v)}" for k, v in {**sweep.fixed, **values}.items()]
    return ["config", "id", *(a for item in items for a in ("--set", item))]


def dry_run_rows(out: str) -> list[list[str]]:
    """The listing's run lines split into columns (order, run id, state, epochs, steps,
    ms/step, estimate)."""
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0].isdigit() and "[" in line:
            rows.append(parts[:7])
    return rows


def test_seed_grid_dry_run_lists_every_run_with_its_id_and_estimate(tmp_path, capsys) -> None:
    out = tmp_path / "runs"
    assert main(["sweep", SEED, "--out", str(out), "--dry-run", "--workers", "2",
                 "--bench", str(seed_bench(tmp_path))]) == 0
    printed = capsys.readouterr().out
    rows = dry_run_rows(printed)
    assert len(rows) == 72
    sweep = load_sweep(SEED)
    _, unique = runs(sweep, {}, 1, lambda _: None)
    assert [r[1] for r in rows] == list(unique)  # the order the sweep runs them: longest first
    assert [int(r[0]) for r in rows] == list(range(1, 73))
    steps = math.ceil(50000 / 128) * 100  # 391 steps an epoch, 100 epochs
    for (_, rid, state, epochs, n, ms, estimate), point in zip(rows, unique.values()):
        model = point.values["model.name"]
        assert (state, epochs, int(n.replace(",", "")), float(ms)) == \
            ("new", "100/100", steps, MS[model])
        assert estimate == duration(steps * MS[model] / 1e3)  # 13m02s, 6m31s
        # the run id is the one `slt config id` gives for that point's config
        capsys.readouterr()
        assert main(config_id_args(SEED, point.values)) == 0
        assert capsys.readouterr().out.strip() == rid
    total = 36 * steps * (MS["resnet18"] + MS["vgg16"]) / 1e3
    assert f"estimate: {duration(total)} of search steps in all" in printed
    assert "72 runs: 72 new; 7,200 epochs, 2,815,200 steps to run" in printed
    assert "caveat: an estimate is steps left x ms/step (search_ms read from" in printed
    assert not out.exists()


def test_dry_run_totals_and_the_pool(tmp_path) -> None:
    result = dry_run(load_sweep(SEED), tmp_path / "none", {}, 2, 1, bench=str(seed_bench(
        tmp_path)))
    assert steps_per_epoch(load_sweep(SEED).points()[0].config) == 391  # 50,000 / 128
    per = {m: 391 * 100 * ms / 1e3 for m, ms in MS.items()}
    assert per == {"resnet18": 782.0, "vgg16": 391.0}
    assert [r.seconds for r in result.rows] == \
        [per[r.values["model.name"]] for r in result.rows]
    assert result.total_seconds() == pytest.approx(36 * 782 + 36 * 391)
    # longest first by prunable weights: VGG-16 (14.7M) before ResNet-18 (11.2M), so two
    # workers each take 18 VGG runs, then 18 ResNet runs
    assert result.wall_seconds() == pytest.approx(18 * 391 + 18 * 782)
    assert pool_wall([5, 1, 1, 1], 2) == 5 and pool_wall([1, 1, 1], 1) == 3
    assert pool_wall([], 3) == 0


def test_a_network_missing_from_the_bench_file_is_named(tmp_path, capsys) -> None:
    bench = bench_file(tmp_path, [{"model": "resnet18", "input": "3x32x32", "batch": 128,
                                   "mode": "fp32", "search_ms": 20.0}])
    assert main(["sweep", SEED, "--out", str(tmp_path / "o"), "--dry-run", "--bench",
                 str(bench)]) == 0
    printed = capsys.readouterr().out
    vgg = [r for r in dry_run_rows(printed) if "-vgg16-" in r[1]]
    assert len(vgg) == 36 and all(r[5:] == ["?", "?"] for r in vgg)
    assert "36 runs without an estimate, not counted" in printed
    assert "no ms/step for vgg16 3x32x32 batch 128 fp32: time it with slt bench search " \
           "--model vgg16 --input 32 --batch 128 --modes fp32 --json FILE" in printed


def test_proxy_has_the_seed_grids_axes_and_is_small() -> None:
    sweep, seed = load_sweep(PROXY), load_sweep(SEED)
    assert {k: v for k, v in sweep.axes.items() if k != "run.seed"} == AXES
    points = sweep.points()
    assert len(points) == 24 and all(p.config is not None for p in points)
    for p in points:
        cfg = p.config
        assert cfg.search.epochs <= 2 and cfg.data.train_limit == 2000
        assert cfg.model.width == 0.125
    # every other setting as in the GPU file
    same = {k: v for k, v in seed.fixed.items() if k != "search.epochs"}
    assert {k: sweep.fixed[k] for k in same} == same


# the tiny planted-teacher runs of the local sweep tests, 1 epoch, over seeds
TINY = TINY_SET.replace("search.epochs = 2", "search.epochs = 1") + "[axes]\nrun.seed = {seeds}\n"


def tiny_bench(tmp_path: Path, ms: float = 5.0) -> Path:
    return bench_file(tmp_path, [{"model": "mlp", "input": "8", "batch": 64, "mode": "fp32",
                                  "search_ms": ms}], overrides=["model.hidden=[16, 16]"])


def test_finished_failed_and_new_points(tmp_path, capsys) -> None:
    done = tmp_path / "done.toml"
    done.write_text(TINY.format(seeds="[0]"))
    out = tmp_path / "runs"
    run_sweep(load_sweep(done), out, progress=False, log=lambda _: None)
    grid = tmp_path / "grid.toml"
    grid.write_text(TINY.format(seeds="[0, 1, 2]"))
    points = load_sweep(grid).points()
    write_error(points[2].config, out, "out of memory", "")  # seed 2 failed before a step
    before = snapshot(out)
    assert main(["sweep", str(grid), "--out", str(out), "--dry-run", "--bench",
                 str(tiny_bench(tmp_path))]) == 0
    printed = capsys.readouterr().out
    rows = {r[1]: r for r in dry_run_rows(printed)}
    ids = [run_id(p.config) for p in points]
    assert rows[ids[0]][2:] == ["finished", "0/1", "0", "-", "0.0s"]
    assert rows[ids[1]][2:] == ["new", "1/1", "4", "5.0", "0.0s"]  # 4 steps x 5 ms
    assert rows[ids[2]][2:7] == ["failed", "1/1", "4", "5.0", "0.0s"]
    assert f"{ids[2]}  failed  " in printed and printed.count("failed: out of memory") == 1
    assert "3 runs: 1 finished, 1 failed, 1 new; 2 epochs, 8 steps to run" in printed
    result = dry_run(load_sweep(grid), out, {}, 1, 1, bench=str(tiny_bench(tmp_path)))
    assert [(r.state, r.epochs_left, r.steps_left, r.seconds) for r in result.rows] == [
        ("finished", 0, 0, 0.0), ("new", 1, 4, 0.02), ("failed", 1, 4, 0.02)]
    assert snapshot(out) == before  # nothing written, nothing renamed


def test_a_partial_run_costs_its_epochs_left(tmp_path, capsys) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(TINY.format(seeds="[0]").replace("search.epochs = 1", "search.epochs = 3"))
    cfg = load_sweep(grid).points()[0].config
    out = tmp_path / "runs"
    # stopped after one epoch as Ctrl-C would, by a process that then ends (a live writer's
    # run would read as running elsewhere)
    code = ("import sys; from slt.sweeps.grid import load_sweep; "
            "from slt.engine.run import run_search; "
            "run_search(load_sweep(sys.argv[1]).points()[0].config, sys.argv[2], "
            "stop_after_epochs=1, log=lambda _: None)")
    subprocess.run([sys.executable, "-c", code, str(grid), str(out)], check=True)
    assert main(["sweep", str(grid), "--out", str(out), "--dry-run", "--bench",
                 str(tiny_bench(tmp_path, ms=2.5))]) == 0
    printed = capsys.readouterr().out
    assert dry_run_rows(printed) == [["1", run_id(cfg), "partial", "2/3", "8", "2.5", "0.0s"]]
    assert "1 runs: 1 partial; 2 epochs, 8 steps to run" in printed
    result = dry_run(load_sweep(grid), out, {}, 1, 1, bench=str(tiny_bench(tmp_path, ms=2.5)))
    assert result.rows[0].seconds == pytest.approx(8 * 2.5 / 1e3)


def test_timed_here_when_no_bench_file(tmp_path, capsys) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(TINY.format(seeds="[0, 1]"))
    result = dry_run(load_sweep(grid), tmp_path / "none", {}, 2, 1, steps=1,
                     log=lambda _: None)
    assert len(result.timings.ms) == 1  # one network for both seeds
    ms = next(iter(result.timings.ms.values()))
    assert ms > 0 and result.timings.failed == {}
    assert [r.seconds for r in result.rows] == [pytest.approx(4 * ms / 1e3)] * 2
    assert result.wall_seconds() == pytest.approx(4 * ms / 1e3)  # two workers, two runs
    assert main(["sweep", str(grid), "--out", str(tmp_path / "o"), "--dry-run",
                 "--dry-run-steps", "1"]) == 0
    captured = capsys.readouterr()
    assert "timed here (cpu)" in captured.out or "timed here (cuda" in captured.out
    assert "timing mlp 8 batch 64 fp32 (model.hidden=[16, 16])" in captured.err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, why", [
    (None, "cannot be read"),
    ("{not json", "not valid JSON"),
    ('{"rows": 3}', "'rows' is not a list"),
    ('{"device": "cpu"}', "no 'rows' entry"),
    ('{"rows": []}', "no rows"),
    ('{"rows": [{"model": "mlp", "input": "8", "batch": 64, "mode": "fp32"}]}',
     "row 1: 'search_ms' is missing"),
    ('{"rows": [{"model": "mlp", "input": "8", "batch": 64, "mode": "fp33", "search_ms": 1}]}',
     "row 1: mode 'fp33'"),
    ('{"rows": [{"model": "mlp", "input": "8", "batch": 64, "mode": "fp32", "search_ms": -1}]}',
     "not a positive time"),
])
def test_a_bad_bench_file_is_one_line(tmp_path, capsys, content, why) -> None:
    bench = tmp_path / "bench.json"
    if content is not None:
        bench.write_text(content)
    grid = tmp_path / "grid.toml"
    grid.write_text(TINY.format(seeds="[0]"))
    code = main(["sweep", str(grid), "--out", str(tmp_path / "o"), "--dry-run", "--bench",
                 str(bench)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith(f"slt: error: --bench {bench}")
    assert why in err
    assert not (tmp_path / "o").exists()


def test_bad_command_lines_are_one_line(tmp_path, capsys) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(TINY.format(seeds="[0]"))
    for argv, why in (
        (["sweep", str(tmp_path / "missing.toml"), "--dry-run"], "config file not found"),
        (["sweep", str(grid), "--bench", "x.json"], "go with --dry-run"),
        (["sweep", str(grid), "--dry-run", "--dry-run-steps", "0"], "at least 1"),
        (["sweep", str(grid), "--dry-run", "--workers", "0"], "at least 1"),
    ):
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and why in err, err
    assert not (tmp_path / "o").exists()
    assert os.listdir(tmp_path) == ["grid.toml"]
