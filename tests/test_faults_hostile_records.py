"""Text files from elsewhere (configs, run records) nested past Python's stack or holding
numbers past its limits: one line (or a damaged record), never a RecursionError."""

from __future__ import annotations

from pathlib import Path

import pytest

from slt.config.toml import parse_value
from slt.errors import ConfigError
from slt.resolve import load
from slt.rundir import read_json, read_metrics

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("body, why", [
    (f"x = {DEEP}\n", "nested too deeply"),
    ("[search]\nepochs = " + "9" * 5000 + "\n", "Exceeds the limit"),
    ("[search]\nepochs = 1\n\xff\n", "not valid TOML"),
])
def test_a_hostile_config_file_is_one_config_error(tmp_path: Path, body: str, why: str):
    path = tmp_path / "hostile.toml"
    path.write_bytes(body.encode("utf-8", "surrogateescape") if "\xff" not in body
                     else body.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load(str(path), [])
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"{path}: not valid TOML") and why in line


def test_a_set_value_nested_too_deeply_is_a_string():
    assert parse_value(DEEP) == DEEP  # then the key's type check names it, in one line


@pytest.mark.parametrize("body, why", [
    (DEEP, "nested too deeply"),
    ('{"epoch": ' + "9" * 5000 + "}", "Exceeds the limit"),
])
def test_a_hostile_run_record_is_damaged_not_raised(tmp_path: Path, body: str, why: str):
    path = tmp_path / "summary.json"
    path.write_text(body)
    obj, problem = read_json(path)
    assert obj is None and problem.startswith("summary.json is not valid JSON") and why in problem
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"epoch": 1, "test_acc": 0.5}\n' + body + "\n")
    rows, bad = read_metrics(metrics)
    assert rows == [{"epoch": 1, "test_acc": 0.5}] and bad == 1
