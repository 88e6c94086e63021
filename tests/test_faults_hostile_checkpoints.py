"""Hostile checkpoints: `weights_only` loading stops code, and every value is checked
against the run before it resumes. An impossible step, a string, an ill-shaped tensor or a
NaN score is one line naming checkpoint.pt and the field ("damaged", never "lower the lr"),
the run refuses, and the file stays as it was."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from slt import resolve
from slt.cli import main
from slt.engine.run import run_search
from slt.errors import SltError
from tests.conftest import TINY

# 256 examples in batches of 64: 4 steps an epoch, 3 epochs; a checkpoint after every step
MID = [*TINY, "run.checkpoint_every=1"]
FIX = "away (or delete it) to restart this run from scratch"


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> dict[str, Path]:
    """Run directories stopped after epoch 1, and inside epoch 1 (after its step 2), of a
    plain, a bernoulli (its checkpoint holds a generator's state) and an iterand run (it
    holds the weights the rule changes)."""
    root = tmp_path_factory.mktemp("stopped")
    out = {}
    for name, overrides, stop in (
            ("epoch", TINY, {"stop_after_epochs": 1}),
            ("mid", MID, {"stop_after_steps": 2}),
            ("bernoulli", [*MID, "search.scorer=bernoulli"], {"stop_after_steps": 2}),
            ("iterand", [*TINY, "search.scorer=iterand"], {"stop_after_epochs": 1})):
        cfg = resolve.load("quick.toml", overrides)
        result = run_search(cfg, root / name, log=quiet, **stop)
        assert result.status == "stopped"
        out[name] = result.run_dir
    return out


def copy_run(stopped: dict[str, Path], which: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a stopped run: (out folder, checkpoint path)."""
    src = stopped[which]
    out = tmp_path / "runs"
    shutil.copytree(src, out / src.name)
    return out, out / src.name / "checkpoint.pt"


def overrides_of(which: str) -> list[str]:
    return {"epoch": TINY, "mid": MID, "bernoulli": [*MID, "search.scorer=bernoulli"],
            "iterand": [*TINY, "search.scorer=iterand"]}[which]


def edit_checkpoint(path: Path, edit: Callable[[dict[str, Any]], None]) -> bytes:
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)
    return path.read_bytes()


def put(key: str, value: Any) -> Callable[[dict], None]:
    return lambda c: c.__setitem__(key, value)


def scores(fn: Callable[[torch.Tensor], Any]) -> Callable[[dict], None]:
    return lambda c: c["model"].__setitem__("1.scores", fn(c["model"]["1.scores"]))


def nan_at_0(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0] = float("nan")
    return t


def momentum(fn: Callable[[torch.Tensor], Any]) -> Callable[[dict], None]:
    def edit(c: dict) -> None:
        entry = c["optimizer"]["state"][0]
        entry["momentum_buffer"] = fn(entry["momentum_buffer"])
    return edit


def group(key: str, value: Any) -> Callable[[dict], None]:
    return lambda c: c["optimizer"]["param_groups"][0].__setitem__(key, value)


def sched(key: str, value: Any) -> Callable[[dict], None]:
    return lambda c: c["scheduler"].__setitem__(key, value)


# (id, which run, edit, the field the line names)
CASES: list[tuple[str, str, Callable[[dict], None], str]] = [
    ("step-impossible", "epoch", put("step", 99), "step is 99"),
    ("step-negative", "mid", put("step", -1), "step is -1"),
    ("step-string", "mid", put("step", "2"), "step is '2'"),
    ("step-after-last-epoch", "epoch", lambda c: c.update(epoch=3, step=1), "step is 1"),
    ("epoch-string", "epoch", put("epoch", "1"), "epoch '1'"),
    ("epoch-bool", "epoch", put("epoch", True), "epoch True"),
    ("best-epoch-future", "epoch", put("best_epoch", 7), "best_epoch is 7"),
    ("best-acc-string", "epoch", put("best_test_acc", "high"), "best_test_acc"),
    ("elapsed-negative", "epoch", put("elapsed", -5.0), "elapsed"),
    ("elapsed-nan", "epoch", put("elapsed", float("nan")), "elapsed"),
    ("seen-impossible", "mid", put("train_seen", 10 ** 9), "train_seen"),
    ("seen-at-epoch-end", "epoch", put("train_seen", 64.0), "train_seen"),
    ("test-acc-above-1", "epoch", put("test_acc", 2.0), "test_acc"),
    ("test-loss-nan", "epoch", put("test_loss", float("nan")), "test_loss"),
    ("test-acc-tensor", "epoch", put("test_acc", torch.zeros(3)), "test_acc"),
    ("scores-nan", "epoch", scores(nan_at_0), "model[1.scores] holds a NaN"),
    ("scores-inf", "mid", scores(lambda t: t + float("inf")), "model[1.scores] holds a NaN"),
    ("scores-shape", "epoch", scores(lambda t: t[:-1]), "model[1.scores]"),
    ("scores-dtype", "epoch", scores(lambda t: t.double()), "model[1.scores]"),
    ("scores-string", "epoch", scores(lambda t: "0.5"), "model[1.scores]"),
    ("model-missing-key", "epoch", lambda c: c["model"].pop("3.scores"), "model"),
    ("model-not-a-dict", "epoch", put("model", [1, 2]), "model"),
    ("momentum-shape", "mid", momentum(lambda t: t.repeat(2)),
     "optimizer.state[0].momentum_buffer"),
    ("momentum-nan", "mid", momentum(lambda t: t * float("nan")),
     "optimizer.state[0].momentum_buffer holds a NaN"),
    ("momentum-setting", "epoch", group("momentum", 50.0), "optimizer.momentum"),
    ("nesterov-string", "epoch", group("nesterov", "yes"), "optimizer.nesterov"),
    ("lr-nan", "epoch", group("lr", float("nan")), "optimizer.lr"),
    ("params-short", "epoch", group("params", [0, 1]), "optimizer.param_groups.params"),
    ("optimizer-extra-state", "mid",
     lambda c: c["optimizer"]["state"].__setitem__(9, {}), "optimizer.state"),
    ("optimizer-not-a-dict", "epoch", put("optimizer", "sgd"), "optimizer"),
    ("scheduler-last-epoch", "epoch", sched("last_epoch", 99), "scheduler.last_epoch"),
    ("scheduler-string", "epoch", put("scheduler", "cosine"), "scheduler"),
    ("scheduler-base-lrs", "epoch", sched("base_lrs", ["x"]), "scheduler.base_lrs"),
    ("scorer-state-not-a-dict", "mid", put("scorer_state", [1]), "scorer_state"),
    ("generator-string", "bernoulli",
     lambda c: c["scorer_state"].__setitem__("generator", "seed"), "scorer_state.generator"),
    ("generator-short", "bernoulli",
     lambda c: c["scorer_state"].__setitem__("generator", c["scorer_state"]["generator"][:9]),
     "scorer_state.generator"),
    ("scaler-nan", "epoch", put("scaler", {"scale": float("nan")}), "scaler"),
    ("weights-nan", "iterand", lambda c: c["weights"][1].fill_(float("nan")),
     "weights[1] holds a NaN"),
    ("weights-missing-one", "iterand", lambda c: c["weights"].pop(), "weights"),
    ("weights-shape", "iterand", lambda c: c["weights"].__setitem__(0, torch.zeros(3)),
     "weights[0]"),
    ("config-hash-list", "epoch", put("config_hash", ["x"]), "belongs to another config"),
]


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_a_damaged_checkpoint_is_one_line_and_left_in_place(stopped, tmp_path, case_id):
    _, which, edit, words = next(c for c in CASES if c[0] == case_id)
    out, ckpt = copy_run(stopped, which, tmp_path)
    before = edit_checkpoint(ckpt, edit)
    cfg = resolve.load("quick.toml", overrides_of(which))
    with pytest.raises(SltError) as info:
        run_search(cfg, out, log=quiet)
    line = str(info.value)
    assert "\n" not in line and str(ckpt) in line and words in line, line
    assert FIX in line and "lower search.lr" not in line, line
    assert ckpt.read_bytes() == before  # left in place, unchanged
    assert not (ckpt.parent / "summary.json").exists()
    assert not (ckpt.parent / "ticket.slt").exists()


def test_a_nan_score_in_a_checkpoint_says_damaged_on_the_command_line(stopped, tmp_path,
                                                                      capsys):
    out, ckpt = copy_run(stopped, "epoch", tmp_path)
    before = edit_checkpoint(ckpt, scores(nan_at_0))
    capsys.readouterr()
    code = main(["search", "--config", "quick.toml", *[a for o in TINY for a in ("--set", o)],
                 "--out", str(out)])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == (f"slt: error: {ckpt} is damaged: model[1.scores] holds a NaN or an "
                        f"infinity: move {ckpt} {FIX}")
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize("which", ["epoch", "mid", "bernoulli", "iterand"])
def test_an_intact_checkpoint_resumes_to_the_uninterrupted_ticket(stopped, tmp_path, which):
    out, ckpt = copy_run(stopped, which, tmp_path)
    cfg = resolve.load("quick.toml", overrides_of(which))
    resumed = run_search(cfg, out, log=quiet)
    straight = run_search(cfg, tmp_path / "straight", log=quiet)
    assert resumed.status == "finished"
    assert resumed.summary["final_test_acc"] == straight.summary["final_test_acc"]
    assert (resumed.run_dir / "ticket.slt").read_bytes()[:-32] != b""
    a = resumed.ticket
    b = straight.ticket
    assert all(torch.equal(x.mask, y.mask) for x, y in zip(a.layers, b.layers))


def deflate(path: Path) -> bytes:
    """Rewrite a torch.save zip with deflated entries: what torch.save never writes, and
    how a small file inflates to gigabytes under `weights_only` loading."""
    import zipfile

    raw = path.with_suffix(".stored")
    path.rename(raw)
    with zipfile.ZipFile(raw) as src, \
            zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry.filename))
    raw.unlink()
    return path.read_bytes()


def test_a_checkpoint_of_compressed_entries_is_refused_before_it_is_inflated(stopped,
                                                                             tmp_path):
    out, ckpt = copy_run(stopped, "epoch", tmp_path)
    before = deflate(ckpt)
    cfg = resolve.load("quick.toml", TINY)
    with pytest.raises(SltError) as info:
        run_search(cfg, out, log=quiet)
    assert str(info.value) == (f"{ckpt} is damaged: its entries are compressed, which "
                               f"torch.save never writes: move it {FIX}")
    assert ckpt.read_bytes() == before
    assert not (ckpt.parent / "summary.json").exists()


def test_an_export_of_compressed_entries_is_refused(tmp_path):
    from slt.errors import ExportError
    from slt.export import load_state_dict

    path = tmp_path / "state.pt"
    torch.save({"0.weight": torch.zeros(4, 4)}, path)
    assert load_state_dict(path)["0.weight"].shape == (4, 4)  # stored entries: read
    deflate(path)
    with pytest.raises(ExportError) as info:
        load_state_dict(path)
    assert str(info.value) == (f"{path} is not a state dict written by slt export: its "
                               "entries are compressed, which torch.save never writes")


def test_a_rules_own_plain_state_resumes_inside_an_epoch(tmp_path) -> None:
    """A scoring rule's `state()` may hold plain values (a count), not only tensors: the
    checks refuse what is impossible, not what a plug-in legitimately keeps."""
    from slt.scorers.edge_popup import EdgePopup
    from slt.scorers.registry import SCORERS

    class Counting(EdgePopup):
        name = "counting-steps"

        def on_epoch_start(self, ctx) -> None:
            super().on_epoch_start(ctx)
            self.steps = 0

        def after_step(self, layers) -> None:
            self.steps += 1

        def state(self) -> dict[str, Any]:
            return {"steps": self.steps, "note": "counted"}

        def load_state(self, state: dict[str, Any]) -> None:
            self.steps = state["steps"]

    if "counting-steps" not in SCORERS:
        SCORERS.register("counting-steps")(Counting)
    cfg = resolve.load("quick.toml", [*MID, "search.scorer=counting-steps"])
    assert run_search(cfg, tmp_path, stop_after_steps=2, log=quiet).status == "stopped"
    ckpt = torch.load(next(tmp_path.glob("*/checkpoint.pt")), weights_only=True)
    assert ckpt["scorer_state"] == {"steps": 2, "note": "counted"}
    assert run_search(cfg, tmp_path, log=quiet).status == "finished"
