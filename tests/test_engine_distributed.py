"""One search over several processes (torchrun, gloo on the CPU), and checkpoints inside an
epoch: the same samples in the same order at any world size, exact resume everywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slt import config, resolve, ticket
from slt.analysis import jaccard
from slt.data.datasets import load_data
from slt.data.memory import Batches
from slt.data.order import rank_slice
from slt.engine.run import run_search
from tests.conftest import REPO, TINY

TORCHRUN = Path(sys.executable).parent / "torchrun"


def quiet(_: str) -> None:
    pass


def masks_of(run_dir: Path) -> list[torch.Tensor]:
    return [layer.mask for layer in ticket.load(run_dir / "ticket.slt").layers]


def test_rank_slices_cover_each_global_batch_once() -> None:
    for size, world in ((128, 2), (7, 3), (2, 4), (64, 1)):
        parts = [rank_slice(100, 100 + size, r, world) for r in range(world)]
        assert parts[0][0] == 100 and parts[-1][1] == 100 + size
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        sizes = [hi - lo for lo, hi in parts]
        assert max(sizes) - min(sizes) <= 1


def test_every_world_size_sees_the_same_samples_in_the_same_order() -> None:
    cfg = resolve.load("quick.toml", [*TINY, "data.train_size=300"])
    batches = Batches(load_data(cfg.data), torch.device("cpu"))
    alone = list(batches.train_epoch(2, 64, seed=5))
    for world in (2, 4):
        parts = [list(batches.train_epoch(2, 64, seed=5, rank=r, world=world))
                 for r in range(world)]
        for step, (x, y) in enumerate(alone):
            assert torch.equal(torch.cat([p[step][0] for p in parts]), x)
            assert torch.equal(torch.cat([p[step][1] for p in parts]), y)
    resumed = list(batches.train_epoch(2, 64, seed=5, start_step=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(alone[3:], resumed))


@pytest.mark.parametrize("scorer", ["edge-popup", "bernoulli", "iterand"])
def test_a_checkpoint_inside_an_epoch_resumes_to_the_same_ticket(tmp_path, scorer) -> None:
    overrides = [*TINY, "data.train_size=640", "search.epochs=2", "run.checkpoint_every=3",
                 f"search.scorer={scorer}"]
    cfg = resolve.load("quick.toml", overrides)
    straight = run_search(cfg, tmp_path / "a", log=quiet)
    stopped = run_search(cfg, tmp_path / "b", stop_after_steps=1, log=quiet)
    assert stopped.status == "stopped"
    ckpt = torch.load(stopped.run_dir / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 3)  # 3 of epoch 1's 10 steps
    again = run_search(cfg, tmp_path / "b", stop_after_steps=2, log=quiet)
    assert again.status == "stopped"  # after step 6 of epoch 1
    resumed = run_search(cfg, tmp_path / "b", log=quiet)
    assert resumed.status == "finished"
    assert all(torch.equal(a, b) for a, b in zip(masks_of(straight.run_dir),
                                                 masks_of(resumed.run_dir)))
    assert resumed.summary["final_test_acc"] == straight.summary["final_test_acc"]
    rows = [json.loads(x) for x in (resumed.run_dir / "metrics.jsonl").read_text().split("\n")
            if x]
    rows_a = [json.loads(x) for x in (straight.run_dir / "metrics.jsonl").read_text().split("\n")
              if x]
    assert [r["epoch"] for r in rows] == [1, 2]
    for a, b in zip(rows_a, rows):  # the epoch's training totals survived the interruptions
        assert (a["train_loss"], a["train_acc"], a["test_acc"]) == \
            (b["train_loss"], b["train_acc"], b["test_acc"])


@pytest.mark.parametrize("rule", [
    ["search.scorer=gem-miner", "search.scorer.prune_every=1"],  # prunes at an epoch's start
    ["search.scorer=iterand", "search.scorer.rate=0.9", "search.lr=0.5"],  # re-randomises
    ["search.scorer=bernoulli"], ["search.scorer=edge-popup"]])
def test_a_resume_inside_a_later_epoch_does_not_repeat_its_start(tmp_path, rule) -> None:
    cfg = resolve.load("quick.toml", [*TINY, "data.train_size=640", "search.epochs=3",
                                     "run.checkpoint_every=3", *rule])
    straight = run_search(cfg, tmp_path / "a", log=quiet)
    assert run_search(cfg, tmp_path / "b", stop_after_epochs=1, log=quiet).status == "stopped"
    assert run_search(cfg, tmp_path / "b", stop_after_steps=1, log=quiet).status == "stopped"
    ckpt = torch.load(next((tmp_path / "b").iterdir()) / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 3)  # inside epoch 2
    resumed = run_search(cfg, tmp_path / "b", log=quiet)
    assert all(torch.equal(a, b) for a, b in zip(masks_of(straight.run_dir),
                                                 masks_of(resumed.run_dir)))
    assert resumed.summary["final_test_acc"] == straight.summary["final_test_acc"]


def torchrun(args: list[str], nproc: int = 2, **kw) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}",
                             str(REPO / "run.py"), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def search_args(overrides: list[str], out: Path) -> list[str]:
    return ["search", "--config", "mnist_lenet.toml", "--out", str(out), "--no-progress",
            *[a for o in overrides for a in ("--set", o)]]


@pytest.fixture
def mnist_overrides(shared_data) -> list[str]:
    return [f"data.root={shared_data}", "data.train_limit=4096", "data.test_limit=1000",
            "search.epochs=2", "run.threads=1", "run.progress=false"]


@pytest.mark.slow
@pytest.mark.data
def test_two_processes_search_one_ticket(tmp_path, mnist_overrides) -> None:
    proc = torchrun(search_args(mnist_overrides, tmp_path / "two"))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    runs = list((tmp_path / "two").iterdir())
    assert len(runs) == 1  # one run directory, written by rank 0
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["world_size"] == 2
    cfg = resolve.load("mnist_lenet.toml", mnist_overrides)
    assert runs[0].name == config.run_id(cfg)  # the world size is not in the run id
    assert summary["n_ticket"] == round(0.1 * summary["n_prunable"])  # exact k
    alone = run_search(cfg, tmp_path / "one", log=quiet)
    overlap = jaccard(masks_of(runs[0]), masks_of(alone.run_dir))
    accs = (summary["final_test_acc"], alone.summary["final_test_acc"])
    print(f"2 processes vs 1: Jaccard {overlap:.4f}, test acc {accs[0]:.4f} vs {accs[1]:.4f}")
    # the same samples, gradients summed in another order: float rounding moves a few
    # near-tied scores across the cut, and nothing else
    assert overlap > 0.95
    assert abs(accs[0] - accs[1]) < 0.02


@pytest.mark.slow
@pytest.mark.data
def test_a_rank_killed_mid_epoch_takes_the_job_down_and_the_rerun_is_exact(
        tmp_path, mnist_overrides) -> None:
    overrides = [*mnist_overrides, "run.checkpoint_every=8", "search.epochs=3"]
    args = search_args(overrides, tmp_path / "runs")
    straight = torchrun(search_args(overrides, tmp_path / "straight"))
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]
    proc = torchrun(args, start_new_session=True)
    cfg = resolve.load("mnist_lenet.toml", overrides)
    ckpt = tmp_path / "runs" / config.run_id(cfg) / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert len(pids) == 2, workers.stdout
    os.kill(pids[-1], signal.SIGKILL)  # one rank dies, as one killed for memory would
    t0 = time.time()
    proc.communicate(timeout=180)  # the job ends, it does not hang
    assert proc.returncode != 0 and time.time() - t0 < 180
    rerun = torchrun(args)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert "resuming" in out  # from the dead job's checkpoint, not from the start
    rows = [[json.loads(x) for x in (tmp_path / d / config.run_id(cfg) / "metrics.jsonl")
             .read_text().splitlines()] for d in ("straight", "runs")]
    assert [r["epoch"] for r in rows[1]] == [1, 2, 3]
    for a, b in zip(*rows):  # the group's training totals survived the kill, counted once
        assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
    a = masks_of(tmp_path / "straight" / config.run_id(cfg))
    b = masks_of(tmp_path / "runs" / config.run_id(cfg))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# --- searches on streamed data -------------------------------------------------------------


def folder_overrides(root: Path, stream: bool) -> list[str]:
    return ["data.name=imagefolder", f"data.root={root}", f"data.stream={str(stream).lower()}",
            "data.workers=2", "model.name=conv2", "model.width=0.25", "search.epochs=2",
            "search.batch_size=8", "search.ticket_density=0.25", "source.density=0.5",
            "run.progress=false", "run.checkpoint_every=2"]


def test_a_streamed_search_finds_the_in_memory_ticket_and_resumes_inside_an_epoch(
        tmp_path) -> None:
    from tests.test_data_stream import folder_tree

    root = folder_tree(tmp_path / "images", per_class=10)
    memory = run_search(resolve.load("quick.toml", folder_overrides(root, False)),
                        tmp_path / "memory", log=quiet)
    cfg = resolve.load("quick.toml", folder_overrides(root, True))
    assert config.run_id(cfg) == memory.run_dir.name  # streaming is how, not what
    stopped = run_search(cfg, tmp_path / "stream", stop_after_steps=1, log=quiet)
    assert stopped.status == "stopped"
    streamed = run_search(cfg, tmp_path / "stream", log=quiet)
    assert all(torch.equal(a, b) for a, b in zip(masks_of(memory.run_dir),
                                                 masks_of(streamed.run_dir)))
    assert streamed.summary["final_test_acc"] == memory.summary["final_test_acc"]


def test_a_short_search_on_an_imagenet_tree(tmp_path) -> None:
    from tests.test_data_stream import imagenet_tree

    root = imagenet_tree(tmp_path / "imagenet")
    cfg = resolve.load("quick.toml", [
        "data.name=imagenet", f"data.root={root}", "data.stream=true", "data.workers=2",
        "model.name=conv2", "model.width=0.125", "search.epochs=1", "search.batch_size=4",
        "search.ticket_density=0.25", "source.density=0.5", "run.progress=false"])
    result = run_search(cfg, tmp_path / "runs", log=quiet)
    assert result.status == "finished"
    saved = ticket.load(result.run_dir / "ticket.slt")
    assert saved.header["spec"] == {"shape": [3, 224, 224], "num_classes": 3}
    assert 0.0 <= result.summary["final_test_acc"] <= 1.0
    assert result.summary["n_ticket"] == round(0.25 * result.summary["n_prunable"])
