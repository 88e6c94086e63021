"""Model references everywhere the built-ins go: sweeps and the survival report, one top-k
call per forward for every searched layer, TensorBoard, speed modes with a resume inside an
epoch, torchrun, and a SLURM-style job (submitit's local executor)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slt
from slt import config, resolve
from slt import ticket as ticket_io
from slt.engine.run import run_search
from slt.reporting.write import write_report
from slt.scorers import base as scorer_base
from tests.conftest import REPO
from tests.test_engine_distributed import torchrun
from tests.test_models_reference import FACTORIES, image_tree, quiet, tree_run

TINY_VIT = f"model.name={FACTORIES}:tiny_transformer"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return image_tree(tmp_path_factory.mktemp("images"), per_class=8)


def masks(run_dir: Path) -> list[torch.Tensor]:
    return [tl.mask for tl in ticket_io.load(run_dir / "ticket.slt").layers]


def write_sweep(folder: Path, images: Path, *extra: str) -> Path:
    fixed = dict(o.split("=", 1) for o in tree_run(images, TINY_VIT, *extra))
    path = folder / "grid.toml"
    path.write_text("[set]\n" + "".join(f"{k} = {json.dumps(config.parse_value(v))}\n"
                                        for k, v in fixed.items())
                    + "[axes]\nsource.density = [1.0, 0.5]\n")
    return path


def test_a_sweep_of_a_python_reference_reports_survival(tmp_path, images) -> None:
    out = tmp_path / "runs"
    for density in (1.0, 0.5):  # someone else's runs in the same folder, another python: model
        run_search(resolve.load(None, tree_run(images, f"model.name={FACTORIES}:tied",
                                               f"source.density={density}")), out, log=quiet)
    outcome = slt.sweep(write_sweep(tmp_path, images), out=out, log=None)
    assert len(outcome.done) == 2 and not outcome.failed
    report = (out / "report" / "report.md").read_text()
    # the sweep trusts its own model only: the other is not rebuilt, said once
    notes = [line for line in report.splitlines() if "were not evaluated" in line]
    assert len(notes) == 1 and f"{FACTORIES}:tied is code named by the file" in notes[0]
    assert float(survival_row(report)[4]) >= 0  # the surviving part, evaluated
    for cache in out.glob("*/survival-*.json"):  # the report's cache in the run dirs
        cache.unlink()
    # someone else's folder: rebuilding its python: model needs trust, said once
    again = write_report(out, out=tmp_path / "elsewhere", log=quiet).read_text()
    notes = [line for line in again.splitlines() if "were not evaluated" in line]
    assert len(notes) == 2
    assert sum("tiny_transformer is code named by the file" in n for n in notes) == 1
    assert "pass trust_model=True" in again and survival_row(again)[4] == "–"
    trusted = write_report(out, out=tmp_path / "trusted", log=quiet, trust_model=True)
    assert survival_row(trusted.read_text()) == survival_row(report)


def survival_row(report: str) -> list[str]:
    """The cells of the survival table's row of the tiny transformer at d = 0.5."""
    section = report[report.index("## Survival as the source thins"):]
    row = next(line for line in section.splitlines()
               if "tiny_transformer | 0.5" in line)
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_one_topk_call_per_forward_covers_every_searched_layer(monkeypatch) -> None:
    calls = []
    real = scorer_base.segmented_topk_mask

    def counting(values, offsets, ks):
        calls.append(len(ks))
        return real(values, offsets, ks)

    monkeypatch.setattr(scorer_base, "segmented_topk_mask", counting)
    from slt.network import build_network
    from slt.spec import DataSpec

    cfg = resolve.load(None, ["data.name=cifar10", "model.name=timm:vit_tiny_patch16_224",
                              "model.kwargs.img_size=32", "model.kwargs.patch_size=4",
                              "model.kwargs.depth=2", "source.density=0.5"])
    net = build_network(cfg, DataSpec((3, 32, 32), 10))
    net(torch.zeros(2, 3, 32, 32)).sum().backward()
    assert calls == [len(net.searched_layers)] == [10]  # patch, 4 per block x 2, head


def test_tensorboard_logs_a_reference_model(tmp_path, images) -> None:
    pytest.importorskip("tensorboard")
    cfg = resolve.load(None, tree_run(images, TINY_VIT, "run.tensorboard=true"))
    result = run_search(cfg, tmp_path, log=quiet)
    assert list(result.run_dir.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_speed_modes_resume_inside_an_epoch_to_the_same_ticket(tmp_path, images):
    cfg = resolve.load(None, tree_run(images, TINY_VIT,
                                      "search.epochs=2", "run.checkpoint_every=2",
                                      "run.precision=bf16", "run.channels_last=true"))
    straight = run_search(cfg, tmp_path / "a", log=quiet)
    assert run_search(cfg, tmp_path / "b", stop_after_steps=1, log=quiet).status == "stopped"
    resumed = run_search(cfg, tmp_path / "b", log=quiet)
    assert all(torch.equal(a, b) for a, b in zip(masks(straight.run_dir),
                                                 masks(resumed.run_dir)))
    assert resumed.summary["final_test_acc"] == straight.summary["final_test_acc"]


@pytest.mark.slow
def test_two_processes_search_a_reference_model(tmp_path, images) -> None:
    sets = tree_run(images, TINY_VIT, "search.epochs=2", "source.density=0.5", "run.threads=1")
    defaults = tmp_path / "defaults.toml"
    defaults.write_text("# slt's defaults\n")
    proc = torchrun(["search", "--config", str(defaults), "--out", str(tmp_path / "two"),
                     "--no-progress", *[a for o in sets for a in ("--set", o)]])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (run_dir,) = list((tmp_path / "two").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    cfg = resolve.load(defaults, sets)
    assert run_dir.name == config.run_id(cfg)
    alone = run_search(cfg, tmp_path / "one", log=quiet)
    pairs = list(zip(masks(run_dir), masks(alone.run_dir)))
    same = sum(int((a & b).sum()) for a, b in pairs) / sum(int((a | b).sum()) for a, b in pairs)
    assert same > 0.95  # the same samples; only the order of summed gradients differs


@pytest.mark.slow
def test_a_submitit_job_searches_a_reference_model(tmp_path, images) -> None:
    pytest.importorskip("submitit")
    sweep = write_sweep(tmp_path, images)
    out = tmp_path / "runs"
    done = subprocess.run([sys.executable, str(REPO / "run.py"), "sweep", str(sweep), "--out",
                           str(out), "--launcher", "submitit-local", "--wait", "--poll", "1",
                           "--no-progress"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tickets = sorted(out.glob("*/ticket.slt"))
    assert len(tickets) == 2
    t = ticket_io.load(tickets[0])
    assert t.config.model.name == f"{FACTORIES}:tiny_transformer"
    assert slt.evaluate(t, trust_model=True).same_as_recorded
