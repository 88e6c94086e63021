"""Tickets naming model references, from others: a python: reference is code, imported only
when trusted; a library reference cannot load weights or files through its arguments."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slt
from slt import resolve, ticket
from slt.engine.run import run_search
from slt.errors import ConfigError, TicketError
from tests.conftest import REPO, TINY
from tests.test_faults_hostile_tickets import craft

EVIL = "python:tests.side_effect_factory:build"


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def source_ticket(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tickets")
    result = run_search(resolve.load("quick.toml", TINY), root / "runs", log=quiet)
    return result.run_dir / "ticket.slt"


def named(model: dict) -> object:
    def edit(header: dict) -> None:
        header["config"]["model"] = {**header["config"]["model"], **model}
    return edit


def slt_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_python_reference_in_a_ticket_is_not_imported_unless_trusted(
        source_ticket, tmp_path, monkeypatch) -> None:
    crafted = craft(source_ticket, tmp_path / "evil.slt", named({"name": EVIL}))
    mark = tmp_path / "imported"
    env = {**os.environ, "SLT_TEST_IMPORT_MARK": str(mark)}
    monkeypatch.setenv("SLT_TEST_IMPORT_MARK", str(mark))
    assert "tests.side_effect_factory" not in sys.modules
    t = ticket.load(crafted)  # read and checked from its own header
    assert t.config.model.name == EVIL
    for attempt in (lambda: slt.evaluate(t), lambda: t.to_module(),
                    lambda: ticket.rebuild(t, torch.device("cpu"))):
        with pytest.raises(ConfigError, match="is code named by the file"):
            attempt()
    for args in (["eval", str(crafted)],
                 ["export", str(crafted), "--out", str(tmp_path / "m.pt")]):
        done = slt_cli(*args, env=env)
        assert done.returncode == 2 and "--trust-model" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not mark.exists() and "tests.side_effect_factory" not in sys.modules
    assert not (tmp_path / "m.pt").exists()
    slt_cli("eval", str(crafted), "--trust-model", env=env)  # the user's choice: imported
    assert mark.read_text() == "imported"


@pytest.mark.parametrize("kwargs", [{"pretrained": True},
                                    {"checkpoint_path": "/etc/passwd"},
                                    {"pretrained_cfg_overlay": "x"}])
def test_a_library_reference_cannot_load_weights_or_files(source_ticket, tmp_path,
                                                          kwargs) -> None:
    crafted = craft(source_ticket, tmp_path / "t.slt", named(
        {"name": "timm:vit_tiny_patch16_224", "kwargs": kwargs}))
    with pytest.raises(TicketError) as err:
        ticket.load(crafted)
    key = next(iter(kwargs))
    assert f"malformed ticket field config: model.kwargs.{key}: slt draws every weight" in str(
        err.value)


def test_a_reference_ticket_whose_layers_differ_from_the_model_is_refused(
        source_ticket, tmp_path) -> None:
    crafted = craft(source_ticket, tmp_path / "t.slt", named({"name": "torchvision:resnet18"}))
    with pytest.raises(TicketError, match="malformed ticket field config: model "
                                          "torchvision:resnet18 fails on the data's input"):
        ticket.load(crafted)


def test_a_reference_asking_for_a_huge_model_stops_at_what_the_file_describes(
        source_ticket, tmp_path) -> None:
    crafted = craft(source_ticket, tmp_path / "t.slt", named(
        {"name": "timm:vit_tiny_patch16_224", "kwargs": {"depth": 10 ** 6}}))
    start = time.perf_counter()
    with pytest.raises(TicketError, match=r"builds more than \d+ parameters, far more than "
                                          "the file describes"):
        ticket.load(crafted)
    assert time.perf_counter() - start < 30
