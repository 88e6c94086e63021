"""run.tensorboard: event files read back with TensorBoard's own reader hold every metrics
row and each step's loss and learning rate, once each, also across stops and crashes; a
missing extra is one line before anything is written; the run id ignores the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard", reason="the tb extra is not installed")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from slt import config, resolve  # noqa: E402
from slt.engine.loop import lr_factor  # noqa: E402
from slt.engine.run import run_search  # noqa: E402
from tests.conftest import REPO, TINY  # noqa: E402

# 256 training examples in global batches of 64: 4 steps an epoch, 3 epochs
STEPS, EPOCHS = 4, 3
TB = [*TINY, "run.tensorboard=true", "search.warmup_epochs=1"]


def quiet(_: str) -> None:
    pass


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run's event files as (step, value), as TensorBoard reads
    them (its purge of what an interrupted process wrote included)."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep them all
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def f32(value: float) -> float:
    """What an event file stores of a number (TensorBoard's scalars are float32)."""
    return float(np.float32(value))


def rows(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_event_files_hold_every_epoch_row_and_every_step(tmp_path) -> None:
    cfg = resolve.load("quick.toml", TB)
    result = run_search(cfg, tmp_path, log=quiet)
    run_dir, summary = result.run_dir, result.summary
    assert list(run_dir.glob("events.out.tfevents.*"))  # in the run directory itself
    tags = scalars(run_dir)
    metrics = rows(run_dir)
    assert len(metrics) == EPOCHS
    # every value of every metrics row, at the step that ends its epoch
    assert set(tags) == {"step/loss", "step/lr", *(f"epoch/{k}" for k in metrics[0])}
    for key in metrics[0]:
        assert tags[f"epoch/{key}"] == [(e * STEPS, f32(r[key]))
                                       for e, r in zip(range(1, EPOCHS + 1), metrics)]
    assert tags["epoch/test_acc"][-1][1] == f32(summary["final_test_acc"])
    # one loss and lr per step, numbered 1..12
    steps = list(range(1, EPOCHS * STEPS + 1))
    assert [s for s, _ in tags["step/loss"]] == steps
    assert [s for s, _ in tags["step/lr"]] == steps
    # the lr each step used: warmup over the first epoch, then the cosine
    lrs = [f32(cfg.search.lr * lr_factor(n - 1, EPOCHS * STEPS, STEPS)) for n in steps]
    assert [v for _, v in tags["step/lr"]] == lrs
    assert lrs[0] < lrs[STEPS - 1] == f32(cfg.search.lr) > lrs[-1] > 0
    # the steps' losses (full batches) average to each epoch's training loss
    losses = [v for _, v in tags["step/loss"]]
    for e, row in enumerate(metrics):
        assert np.mean(losses[e * STEPS:(e + 1) * STEPS]) == pytest.approx(row["train_loss"],
                                                                           rel=1e-6)


def test_a_stopped_and_a_crashed_run_read_back_once_per_step(tmp_path, monkeypatch) -> None:
    cfg = resolve.load("quick.toml", [*TB, "run.checkpoint_every=3"])
    straight = scalars(run_search(cfg, tmp_path / "a", log=quiet).run_dir)

    # 1. stopped at its first checkpoint inside epoch 1 (after step 3)
    out = tmp_path / "b"
    assert run_search(cfg, out, stop_after_steps=1, log=quiet).status == "stopped"
    # 2. resumed, then the power fails while writing the checkpoint after step 8 (epoch
    # 2's end): its steps and epoch row are in the event files already, the checkpoint
    # (after step 7) is not; TensorBoard's reader must drop them on the next resume
    import slt.engine.loop

    real_save, saves = slt.engine.loop.atomic_torch_save, []

    def power_cut(path, obj):
        saves.append(obj["epoch"])
        if len(saves) == 3:  # checkpoints: after steps 4, 7, then 8
            raise RuntimeError("power cut")
        real_save(path, obj)

    monkeypatch.setattr(slt.engine.loop, "atomic_torch_save", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        run_search(cfg, out, log=quiet)
    monkeypatch.setattr(slt.engine.loop, "atomic_torch_save", real_save)
    run_dir = out / config.run_id(cfg)
    written = scalars(run_dir)
    assert [s for s, _ in written["step/loss"]] == list(range(1, 9))
    assert [s for s, _ in written["epoch/test_acc"]] == [4, 8]
    # 3. resumed to the end
    result = run_search(cfg, out, log=quiet)
    assert result.status == "finished"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 3  # one file per process
    resumed = scalars(run_dir)
    # exactly one value per step and epoch, the values of the uninterrupted run (the
    # resume is exact); only the epochs' wall-clock times differ
    assert set(resumed) == set(straight)
    for tag, values in straight.items():
        got = resumed[tag]
        assert [s for s, _ in got] == [s for s, _ in values], tag
        if tag != "epoch/epoch_time_s":
            assert got == values, tag
    assert [s for s, _ in resumed["step/loss"]] == list(range(1, EPOCHS * STEPS + 1))
    assert [s for s, _ in resumed["epoch/epoch"]] == [4, 8, 12]
    assert [v for _, v in resumed["epoch/test_acc"]] == [f32(r["test_acc"])
                                                          for r in rows(run_dir)]


# Imports of tensorboard fail as they do where the package is not installed.
NO_TENSORBOARD = """
import sys
from importlib.abc import MetaPathFinder

class NoTensorBoard(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorboard":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTensorBoard())
from slt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_the_extra_it_is_one_line_and_nothing_is_written(tmp_path) -> None:
    out = tmp_path / "runs"
    args = ["search", "--config", "quick.toml",
            *[a for o in [*TINY, "run.tensorboard=true"] for a in ("--set", o)],
            "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", NO_TENSORBOARD, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["slt: error: run.tensorboard = true needs the tb extra: pip install "
                     "'slt[tb]' (No module named 'tensorboard')"], proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_the_run_id_ignores_tensorboard() -> None:
    plain = resolve.load("quick.toml", TINY)
    with_tb = resolve.load("quick.toml", [*TINY, "run.tensorboard=true"])
    assert with_tb.run.tensorboard and not plain.run.tensorboard
    assert config.run_id(with_tb) == config.run_id(plain)
    assert config.config_hash(with_tb) == config.config_hash(plain)
    assert "run.tensorboard" in [key for key, _, _ in config.describe()]


@pytest.mark.slow
def test_two_processes_log_the_global_batch_loss_once(tmp_path) -> None:
    """Rank 0 alone writes; a step's loss is the group's (the ranks' shares summed)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "two"
    args = ["search", "--config", "quick.toml", "--out", str(out), "--no-progress",
            *[a for o in [*TB, "run.threads=1"] for a in ("--set", o)]]
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2",
                           str(REPO / "run.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = out.iterdir()
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # rank 0's
    two = scalars(run_dir)
    assert [s for s, _ in two["step/loss"]] == list(range(1, EPOCHS * STEPS + 1))
    losses = [v for _, v in two["step/loss"]]
    for e, row in enumerate(rows(run_dir)):
        assert np.mean(losses[e * STEPS:(e + 1) * STEPS]) == pytest.approx(row["train_loss"],
                                                                           rel=1e-6)
    # the first step starts from the same scores as one process's: the same loss
    one = scalars(run_search(resolve.load("quick.toml", TB), tmp_path / "one",
                             log=quiet).run_dir)
    assert two["step/loss"][0][1] == pytest.approx(one["step/loss"][0][1], rel=1e-6)
    assert two["step/lr"] == one["step/lr"]
