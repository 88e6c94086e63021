"""The search on a GPU, end to end: every speed mode runs on CUDA and resumes inside an epoch
to the ticket of an uninterrupted run; a CUDA search finds nearly the CPU's ticket; a compiled
forward finds the same ticket as a plain one; a model reference searches on CUDA. Skipped
without a CUDA device (`pytest -m cuda` runs them on one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slt import resolve, ticket
from slt.analysis import jaccard
from slt.engine.run import run_search
from slt.topk import kernel as cuda_topk
from tests.conftest import TINY
from tests.test_models_reference import FACTORIES, image_tree, quiet, tree_run

pytestmark = pytest.mark.cuda

CONV = ["model.name=conv4", "model.width=0.25", "search.epochs=2", "run.checkpoint_every=2"]
MODES = {
    "fp32": ["run.precision=fp32"],
    "bf16": ["run.precision=bf16"],
    "fp16": ["run.precision=fp16"],
    "bf16+channels_last": ["run.precision=bf16", "run.channels_last=true"],
    "fp16+channels_last+nondet": ["run.precision=fp16", "run.channels_last=true",
                                  "run.deterministic=false"],
}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return image_tree(tmp_path_factory.mktemp("images"), per_class=16)


def masks(run_dir: Path) -> list[torch.Tensor]:
    return [layer.mask for layer in ticket.load(run_dir / "ticket.slt").layers]


@pytest.mark.parametrize("mode", list(MODES))
def test_every_speed_mode_resumes_on_cuda_to_the_same_ticket(tmp_path, images, mode) -> None:
    cfg = resolve.load(None, tree_run(images, *CONV, *MODES[mode], "run.device=cuda"))
    straight = run_search(cfg, tmp_path / "a", log=quiet)
    assert straight.summary["final_test_acc"] is not None
    assert cuda_topk.GATE.disabled is None, cuda_topk.GATE.disabled  # the kernel served
    assert run_search(cfg, tmp_path / "b", stop_after_steps=3, log=quiet).status == "stopped"
    resumed = run_search(cfg, tmp_path / "b", log=quiet)
    if "nondet" in mode:  # atomics may reorder sums: near-tied scores can cross the cut
        assert jaccard(masks(straight.run_dir), masks(resumed.run_dir)) > 0.9
        return
    assert all(torch.equal(a, b) for a, b in zip(masks(straight.run_dir),
                                                 masks(resumed.run_dir)))
    assert resumed.summary["final_test_acc"] == straight.summary["final_test_acc"]


def test_cuda_finds_nearly_the_cpu_ticket(tmp_path) -> None:
    overrides = [*TINY, "model.hidden=[64, 64]", "search.epochs=2"]
    cpu = run_search(resolve.load(None, overrides), tmp_path / "cpu", log=quiet)
    gpu = run_search(resolve.load(None, [*overrides, "run.device=cuda"]), tmp_path / "gpu",
                     log=quiet)
    # the same samples and scores; float sums in another order move a few near-tied scores
    overlap = jaccard(masks(cpu.run_dir), masks(gpu.run_dir))
    assert overlap > 0.9, overlap
    assert abs(cpu.summary["final_test_acc"] - gpu.summary["final_test_acc"]) < 0.05


@pytest.mark.slow
def test_a_compiled_forward_on_cuda_finds_the_same_ticket(tmp_path, images) -> None:
    base = tree_run(images, *CONV, "run.device=cuda", "search.epochs=1")
    plain = run_search(resolve.load(None, base), tmp_path / "a", log=quiet)
    compiled = run_search(resolve.load(None, [*base, "run.compile=true"]), tmp_path / "b",
                          log=quiet)
    assert jaccard(masks(plain.run_dir), masks(compiled.run_dir)) > 0.95


def test_a_model_reference_searches_on_cuda(tmp_path, images) -> None:
    cfg = resolve.load(None, tree_run(images, f"model.name={FACTORIES}:tiny_transformer",
                                      "run.device=cuda", "run.precision=bf16"))
    result = run_search(cfg, tmp_path, log=quiet)
    assert result.summary["n_ticket"] == sum(int(m.sum()) for m in masks(result.run_dir))
    assert cuda_topk.GATE.disabled is None, cuda_topk.GATE.disabled
