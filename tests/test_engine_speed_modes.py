"""Speed modes change how a step runs, not what is selected: resume stays exact in every
precision, a compiled forward finds the same ticket, bf16 matches fp32 within noise."""

from __future__ import annotations

import pytest
import torch

from slt import config, resolve, ticket
from slt.engine.run import run_search
from tests.conftest import TINY


def quiet(_: str) -> None:
    pass


def masks(result) -> list[torch.Tensor]:
    return [layer.mask for layer in ticket.load(result.run_dir / "ticket.slt").layers]


def test_speed_modes_leave_the_run_id_of_existing_runs_alone() -> None:
    base = resolve.load("quick.toml", TINY)
    same = resolve.load("quick.toml", [*TINY, "run.precision=fp32", "run.channels_last=false",
                                      "run.compile=false", "run.deterministic=true",
                                      "run.checkpoint_every=5", "data.stream=false",
                                      "data.workers=7"])
    assert config.run_id(same) == config.run_id(base)
    # modes that may round differently are runs of their own
    for key in ("run.precision=bf16", "run.deterministic=false", "data.train_limit=100",
                "run.channels_last=true", "run.compile=true"):
        assert config.run_id(resolve.load("quick.toml", [*TINY, key])) != config.run_id(base)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_every_precision_resumes_inside_an_epoch_to_the_same_ticket(tmp_path, precision):
    cfg = resolve.load("quick.toml", [*TINY, "data.train_size=640", "search.epochs=2",
                                     "run.checkpoint_every=3", f"run.precision={precision}"])
    straight = run_search(cfg, tmp_path / "a", log=quiet)
    assert run_search(cfg, tmp_path / "b", stop_after_steps=2, log=quiet).status == "stopped"
    if precision == "fp16":  # the grad scaler's state is part of the checkpoint
        ckpt = torch.load(next((tmp_path / "b").iterdir()) / "checkpoint.pt", weights_only=True)
        assert "scale" in ckpt["scaler"]
    resumed = run_search(cfg, tmp_path / "b", log=quiet)
    assert all(torch.equal(a, b) for a, b in zip(masks(straight), masks(resumed)))
    assert resumed.summary["final_test_acc"] == straight.summary["final_test_acc"]


@pytest.mark.slow
def test_a_compiled_forward_finds_the_same_ticket(tmp_path) -> None:
    overrides = [*TINY, "data.train_size=512", "search.epochs=1"]
    plain = run_search(resolve.load("quick.toml", overrides), tmp_path / "a", log=quiet)
    compiled = run_search(resolve.load("quick.toml", [*overrides, "run.compile=true"]),
                          tmp_path / "b", log=quiet)
    assert all(torch.equal(a, b) for a, b in zip(masks(plain), masks(compiled)))
    assert compiled.summary["final_test_acc"] == plain.summary["final_test_acc"]


@pytest.mark.slow
@pytest.mark.data
def test_bf16_matches_fp32_on_mnist_within_noise(tmp_path, shared_data) -> None:
    """Measured over 3 seeds x 3 epochs: fp32 96.90 ± 0.25%, bf16 97.03 ± 0.14% (see
    docs/scaling.md); one seed and one epoch here, allowed 1.5 points apart."""
    accs = {}
    for precision in ("fp32", "bf16"):
        cfg = resolve.load("mnist_lenet.toml", [f"data.root={shared_data}", "search.epochs=1",
                                               f"run.precision={precision}",
                                               "run.progress=false"])
        accs[precision] = run_search(cfg, tmp_path, log=quiet).summary["final_test_acc"]
    assert accs["fp32"] > 0.9 and abs(accs["bf16"] - accs["fp32"]) < 0.015, accs
