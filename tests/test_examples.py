"""The scripts in examples/ run as a user runs them, and say what they should."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name: str, out: Path) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_search_export_finetune(tmp_path) -> None:
    text = run("search_export_finetune.py", tmp_path / "runs")
    found = re.search(r"finished: (\S+), test acc (\d\.\d{4})", text)
    assert found, text
    again = re.search(r"measured again: (\d\.\d{4})", text)
    assert again and again.group(1) == found.group(2)  # the ticket rebuilds to its accuracy
    layers = re.findall(r"source (\d\.\d{3})  ticket (\d\.\d{3})", text)
    assert layers == [("0.500", "0.100")] * 3  # uniform source 0.5, ticket 0.1 per layer
    dense, sparse = map(int, re.search(r"exported: (\d+) bytes dense, (\d+) bytes sparse",
                                       text).groups())
    assert sparse < dense / 3
    tuned = float(re.search(r"fine-tuning \(every weight free\): test acc (\d\.\d{4})",
                            text).group(1))
    assert 0.1 < tuned <= 1.0
    assert (tmp_path / "runs" / found.group(1) / "ticket.slt").is_file()


@pytest.mark.slow
def test_density_sweep_with_own_rule(tmp_path) -> None:
    text = run("density_sweep_with_own_rule.py", tmp_path / "runs")
    assert "6 runs, 0 failed" in text
    rows = re.findall(r"(edge-popup|magnitude-popup) +source density (\d\.\d)  test acc "
                      r"(\d\.\d{4})", text)
    assert sorted((r, d) for r, d, _ in rows) == sorted(
        (r, d) for r in ("edge-popup", "magnitude-popup") for d in ("1.0", "0.5", "0.2"))
    assert all(0.1 < float(acc) <= 1.0 for _, _, acc in rows)  # better than chance (10 classes)
    assert (tmp_path / "runs" / "report" / "report.md").is_file()
