"""`import slt` as a library: the functions the CLI is a thin layer over."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import slt
from slt import resolve
from slt.config.schema import Config
from slt.errors import ConfigError, SltError, TicketError
from tests.conftest import TINY

SLT = [sys.executable, "-m", "slt.cli"]


def quiet(_: str) -> None:
    pass


def test_import_slt_is_light_and_lists_its_functions() -> None:
    code = "import sys, slt; print('torch' in sys.modules, sorted(slt.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ("False ['evaluate', 'load_config', 'load_ticket', 'report', 'search', "
                   "'sweep']")
    with pytest.raises(AttributeError, match="no attribute 'serch'"):
        slt.serch  # noqa: B018


def test_load_config_takes_a_path_a_config_a_dict_and_either_kind_of_overrides() -> None:
    want = resolve.load("quick.toml", ["source.density=0.8", "search.scorer=bernoulli"])
    by_list = slt.load_config("quick.toml", ["source.density=0.8", "search.scorer=bernoulli"])
    by_map = slt.load_config("quick.toml", {"source.density": 0.8,
                                            "search.scorer": "bernoulli"})
    by_cfg = slt.load_config(resolve.load("quick.toml"), {"source.density": 0.8,
                                                          "search.scorer": "bernoulli"})
    tables = {"data": {"name": "planted_teacher", "input_dim": 16, "teacher_hidden": 32,
                       "num_classes": 10, "train_size": 32768, "test_size": 2048},
              "model": {"name": "mlp", "hidden": [256, 256], "init": "signed_constant",
                        "init_scale": "ticket"},
              "source": {"density": 0.8}, "search": {"ticket_density": 0.25, "epochs": 10,
                                                     "scorer": "bernoulli"}}
    by_dict = slt.load_config(tables)
    assert isinstance(want, Config)
    assert by_list == by_map == want
    assert by_dict.search.lr == want.search.lr == 10.0  # the rule's declared lr, filled in
    from slt.config.ids import run_id
    assert run_id(by_dict) == run_id(want)
    from pathlib import Path
    assert slt.load_config("quick.toml", {"data.root": Path("/data/here")}).data.root == \
        "/data/here"
    # by_cfg started from quick.toml resolved with edge-popup: its lr (0.1) is now the user's
    assert by_cfg.search.lr == 0.1 and by_cfg.source.density == 0.8


def test_errors_are_the_clis_error_classes_with_its_message(tmp_path) -> None:
    with pytest.raises(ConfigError) as exc:
        slt.load_config("quick.toml", {"source.densty": 0.2})
    proc = subprocess.run([*SLT, "config", "show", "--config", "quick.toml", "--set",
                           "source.densty=0.2"], capture_output=True, text=True)
    assert proc.stderr.strip() == f"slt: error: {exc.value}"
    with pytest.raises(TicketError):
        slt.load_ticket(tmp_path / "nothing.slt")
    with pytest.raises(ConfigError, match="list of 'key=value' strings or a mapping"):
        slt.load_config(None, "source.density=0.2")
    assert issubclass(TicketError, SltError)


@pytest.mark.slow
def test_slt_search_finds_the_ticket_slt_search_finds(tmp_path) -> None:
    overrides = [*TINY, "search.epochs=2"]
    result = slt.search("quick.toml", overrides=overrides, out=tmp_path / "api", log=None)
    assert result.status == "finished"
    proc = subprocess.run([*SLT, "search", "--config", "quick.toml", "--out",
                           str(tmp_path / "cli"), *[a for o in overrides for a in ("--set", o)]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (cli_dir,) = (tmp_path / "cli").iterdir()
    assert cli_dir.name == result.run_dir.name
    api_ticket, cli_ticket = result.ticket, slt.load_ticket(cli_dir / "ticket.slt")
    assert [t.name for t in api_ticket.layers] == [t.name for t in cli_ticket.layers]
    for a, b in zip(api_ticket.layers, cli_ticket.layers):
        assert (a.mask == b.mask).all()
    cli_summary = json.loads((cli_dir / "summary.json").read_text())
    assert result.summary["final_test_acc"] == cli_summary["final_test_acc"]
    again = slt.search("quick.toml", overrides=overrides, out=tmp_path / "api", log=None)
    assert again.status == "skipped"  # finished already: found, not run again
    measured = slt.evaluate(result.run_dir / "ticket.slt")
    assert measured.test_acc == result.summary["final_test_acc"]
    assert measured.same_as_recorded is True


@pytest.mark.slow
def test_sweep_and_report_through_the_api(tmp_path) -> None:
    grid = tmp_path / "grid.toml"
    from slt.config.toml import parse_value, toml_value

    lines = [f"{k} = {toml_value(parse_value(v))}" for k, v in (o.split("=", 1) for o in TINY)]
    grid.write_text('base = "quick.toml"\n[set]\n' + "\n".join(lines)
                    + '\n[axes]\nrun.seed = [0, 1]\n')
    outcome = slt.sweep(grid, out=tmp_path / "runs", report=False, log=quiet)
    assert [status for _, status in outcome.done] == ["finished", "finished"]
    assert outcome.failed == [] and outcome.skipped == []
    path = slt.report(tmp_path / "runs", evaluate_survival=False, log=quiet)
    assert path == tmp_path / "runs" / "report" / "report.md"
    assert "| all runs |" in path.read_text()
