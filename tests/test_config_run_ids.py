"""Run ids: pinned, unchanged by new keys with defaults, and runs written under the legacy
form are found, renamed once and resumed."""

from __future__ import annotations

import dataclasses
import json

import pytest

from slt import config, resolve
from slt.cli import main
from slt.config.schema import RunConfig
from slt.engine.run import run_search
from slt.reporting.runs import load_runs
from tests.conftest import TINY

# (config, overrides) -> (run id, the legacy run id the same config had before)
PINNED = {
    ("mnist_lenet.toml", ()): ("mnist-mlp-d1-t0.1-df03a853aa99",
                               "mnist-mlp-d1-t0.1-e1d371a6af82"),
    ("quick.toml", ()): ("planted_teacher-mlp-d0.5-t0.25-306f7c46ffb7",
                         "planted_teacher-mlp-d0.5-t0.25-3b9e2e5e78c6"),
    ("cifar10_conv4.toml", ()): ("cifar10-conv4-d0.5-t0.25-4d1661380ef5",
                                 "cifar10-conv4-d0.5-t0.25-86205d254e5b"),
    ("quick.toml", ("search.scorer=gem-miner", "search.scorer.lam=0.5")): (
        "planted_teacher-mlp-d0.5-t0.25-44032425437e",
        "planted_teacher-mlp-d0.5-t0.25-cf5e0dd65c64"),
}


def quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("key", list(PINNED))
def test_run_ids_are_pinned(key) -> None:
    path, overrides = key
    cfg = resolve.load(path, list(overrides))
    assert (config.run_id(cfg), config.legacy_run_id(cfg)) == PINNED[key]


def test_config_id_prints_the_run_directory_name(capsys) -> None:
    assert main(["config", "id", "--config", "mnist_lenet.toml"]) == 0
    assert capsys.readouterr().out == "mnist-mlp-d1-t0.1-df03a853aa99\n"
    assert main(["config", "id", "--config", "quick.toml", "-v"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == PINNED[("quick.toml", ())][0]
    assert "  source.density = 0.5" in lines  # set away from its default, so hashed
    assert not any(line.startswith("  run.") for line in lines)  # all defaults: not hashed


def test_only_values_away_from_their_defaults_are_hashed() -> None:
    base = resolve.load("quick.toml")
    spelled = resolve.load("quick.toml", ["run.seed=0", "search.lr=0.1", "model.width=1.0",
                                          "run.precision=fp32", "data.workers=7"])
    assert config.run_id(spelled) == config.run_id(base)
    values = config.hashed_values(base)
    defaults = config.Config()
    for dotted, value in values.items():
        section, key = dotted.split(".")
        if key not in ("keep", "ticket_density"):
            assert getattr(getattr(defaults, section), key) != value, dotted
    assert config.run_id(resolve.load("quick.toml", ["run.seed=1"])) != config.run_id(base)


def test_a_new_key_with_a_default_renames_no_run(monkeypatch) -> None:
    """A key added to [run] later (here `newkey`, default 7): every existing id stays."""
    before = {k: config.run_id(resolve.load(p, list(o))) for k, (p, o) in
              ((k, k) for k in PINNED)}
    newer = dataclasses.make_dataclass(
        "RunConfig", [("newkey", int, dataclasses.field(default=7))], bases=(RunConfig,),
        frozen=True)
    monkeypatch.setitem(config.SECTIONS, "run", newer)
    after = {k: config.run_id(resolve.load(k[0], list(k[1]))) for k in PINNED}
    assert after == before == {k: v[0] for k, v in PINNED.items()}
    changed = resolve.load("quick.toml", ["run.newkey=8"])
    assert changed.run.newkey == 8
    assert config.run_id(changed) != PINNED[("quick.toml", ())][0]


def legacy_run(monkeypatch, cfg, out, **stop):
    """A run written as slt wrote runs before: legacy directory name and hash inside."""
    with monkeypatch.context() as m:
        m.setattr(config, "config_hash", config.legacy_config_hash)
        for where in ("slt.config.ids", "slt.engine.loop", "slt.engine.checkpoint", "slt.ticket"):
            m.setattr(f"{where}.config_hash", config.legacy_config_hash)
        for where in ("slt.engine.run", "slt.engine.checkpoint"):
            m.setattr(f"{where}.config_hashes", lambda c: (config.legacy_config_hash(c),))
        result = run_search(cfg, out, log=quiet, **stop)
    assert result.run_dir.name == config.legacy_run_id(cfg)
    return result


def test_a_finished_legacy_run_is_renamed_once_and_not_run_again(tmp_path, monkeypatch):
    cfg = resolve.load("quick.toml", TINY)
    old = legacy_run(monkeypatch, cfg, tmp_path)
    summary = json.loads((old.run_dir / "summary.json").read_text())
    assert summary["config_hash"] == config.legacy_config_hash(cfg)
    again = run_search(cfg, tmp_path, log=quiet)
    assert again.status == "skipped"  # finished: found under its legacy name
    assert again.run_dir.name == config.run_id(cfg)
    assert [p.name for p in tmp_path.iterdir()] == [config.run_id(cfg)]
    assert again.summary["final_test_acc"] == summary["final_test_acc"]
    (run,), unreadable = load_runs(tmp_path)
    assert unreadable == []
    assert (run.status, run.acc) == ("finished", summary["final_test_acc"])


def test_a_half_done_legacy_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    cfg = resolve.load("quick.toml", TINY)
    legacy_run(monkeypatch, cfg, tmp_path / "a", stop_after_epochs=1)
    resumed = run_search(cfg, tmp_path / "a", log=quiet)
    assert resumed.status == "finished"
    rows = [json.loads(line) for line in
            (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # epoch 1 kept, not run again
    whole = run_search(cfg, tmp_path / "b", log=quiet)
    assert resumed.summary["final_test_acc"] == whole.summary["final_test_acc"]
    assert (resumed.run_dir / "ticket.slt").read_bytes() != b""
