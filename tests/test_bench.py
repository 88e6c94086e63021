"""The top-k benchmark: its variants compute the same masks on distinct values, its
workloads are the models' layers, and its rows carry consistent ratios and a floor."""

from __future__ import annotations

import json

import pytest
import torch

from slt.bench import (
    FLOOR,
    SORT,
    bench_topk,
    kthvalue_per_layer,
    layer_sizes,
    make_case,
    ours,
    sort_per_layer,
    topk_per_layer,
)
from slt.cli import main
from slt.errors import ConfigError


def test_workloads() -> None:
    assert layer_sizes("lenet-300-100") == [784 * 300, 300 * 100, 100 * 10]
    assert layer_sizes("2^16") == [65536]
    conv6 = layer_sizes("conv6")
    assert len(conv6) == 9 and conv6[0] == 64 * 3 * 9  # six convs, three linears
    with pytest.raises(ConfigError, match="unknown layer set 'vgg'"):
        layer_sizes("vgg")
    with pytest.raises(ConfigError, match="outside"):
        layer_sizes("2^40")


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("keep", [0.5, 0.1, 1.0])
def test_variants_agree_on_distinct_values(scope: str, keep: float) -> None:
    case = make_case([1000, 41, 4096, 3], keep, scope, "cpu", torch.float32)
    assert len(torch.unique(case.values)) == case.values.numel()  # no ties: all must agree
    expected = ours(case)
    assert [int(m.sum()) for m in expected.split(
        [b - a for a, b in zip(case.offsets, case.offsets[1:])])] == case.ks
    for variant in (sort_per_layer, topk_per_layer, kthvalue_per_layer):
        got = torch.cat([m.bool() for m in variant(case)])
        assert torch.equal(got, expected), variant.__name__


def test_rows_are_consistent() -> None:
    rows = bench_topk(["lenet-300-100", "2^12"], [0.5], repeats=2)
    # two scopes for the layer set, one for the single tensor; five rows each
    assert [(r["layers"], r["scope"]) for r in rows[::5]] == [
        ("lenet-300-100", "layer"), ("lenet-300-100", "global"), ("2^12", "layer")]
    assert [r["variant"] for r in rows[:5]] == [SORT, "torch.topk", "torch.kthvalue", "slt.topk",
                                                FLOOR]
    for i in range(0, len(rows), 5):
        group = rows[i:i + 5]
        sort_ms, floor_ms = group[0]["median_ms"], group[4]["median_ms"]
        assert group[0]["speedup_vs_sort"] == 1.0 and group[4]["x_floor"] == 1.0
        for r in group:
            assert r["median_ms"] > 0
            assert r["speedup_vs_sort"] == pytest.approx(sort_ms / r["median_ms"])
            assert r["x_floor"] == pytest.approx(r["median_ms"] / floor_ms)
        # the floor is 5 bytes per element at the measured copy bandwidth
        n, bandwidth = group[4]["n"], group[4]["copy_GBps"] * 1e9
        assert floor_ms == pytest.approx(n * 5 / bandwidth * 1e3)
    assert rows[0]["n"] == 266200 and rows[0]["segments"] == 3 and rows[5]["segments"] == 1


def test_cli_writes_json_and_rejects_bad_input(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "topk", "--layers", "2^10", "--keep", "0.1", "--repeats", "1",
                 "--device", "cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and len(data["rows"]) == 5
    assert "2^10 layer keep 0.1: slt.topk" in capsys.readouterr().out
    assert main(["bench", "topk", "--layers", "2^10", "--keep", "1.5"]) == 2
    assert "--keep 1.5 outside (0, 1]" in capsys.readouterr().err
    assert main(["bench", "topk", "--layers", "resnet", "--repeats", "1"]) == 2
    assert "unknown layer set 'resnet'" in capsys.readouterr().err
