"""The top-k benchmark: its variants compute the same masks on distinct values, its
workloads are the models' layers, and its rows carry consistent ratios and a floor."""

from __future__ import annotations

import json

import pytest
import torch

from slt.bench.topk import (
    FLOOR,
    SORT,
    Timer,
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
from slt.models import build_model


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


# --- slt bench search -------------------------------------------------------------------

def test_modes_and_inputs_parse() -> None:
    from slt.bench.search import Mode, default_modes, parse_input, parse_mode

    assert parse_mode("fp32") == Mode("fp32", False, False, True)
    mode = parse_mode("bf16+cl+compile+nondet")
    assert mode == Mode("bf16", True, True, False)
    assert mode.name == "bf16+channels_last+compile+nondet"
    assert parse_input("32") == (3, 32, 32) and parse_input("28x1") == (1, 28, 28)
    assert default_modes("cpu") == ["fp32", "bf16"]
    assert default_modes("cuda") == ["fp32", "bf16", "bf16+channels_last"]
    with pytest.raises(ConfigError, match="unknown flag 'fast'"):
        parse_mode("bf16+fast")
    with pytest.raises(ConfigError, match="starts with a precision"):
        parse_mode("fp8")
    with pytest.raises(ConfigError, match="--input '3x'"):
        parse_input("3x")


def test_dense_baseline_has_the_masked_layers_shapes() -> None:
    from torch import nn

    from slt.bench.search import Mode, bench_config, dense_model
    from slt.layers import MaskedLayer, masked_layers
    from slt.spec import DataSpec

    cfg = bench_config("resnet20", Mode(), 8, 0.5, 1.0, "cpu", ["model.width=0.5"])
    spec = DataSpec((3, 16, 16), 10)
    masked = masked_layers(build_model(cfg.model, spec))
    dense = dense_model(cfg, spec)
    plain = [m for m in dense.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert not any(isinstance(m, MaskedLayer) for m in dense.modules())
    assert [tuple(m.weight.shape) for m in plain] == [m.weight_shape for m in masked]
    assert [m.stride for m in plain if isinstance(m, nn.Conv2d)] == [
        (m.stride, m.stride) for m in masked if m.weight_shape[2:]]
    assert all(m.bias is None for m in plain)
    # non-affine BatchNorm as in the search: the trained parameters are the layers' weights
    assert sum(p.numel() for p in dense.parameters()) == sum(m.numel for m in masked)
    assert dense(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_dense_step_trains_every_weight_in_the_mode() -> None:
    from slt.bench.search import DenseStep, Mode, bench_config
    from slt.spec import DataSpec

    cfg = bench_config("conv2", Mode("bf16"), 8, 0.5, 1.0, "cpu", ["model.width=0.25"])
    step = DenseStep(cfg, DataSpec((3, 8, 8), 10), torch.device("cpu"))
    before = [p.detach().clone() for p in step.params]
    loss, out = step.step(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(loss)  # autocast on, as the search's
    assert len(before) == 5  # two convs and three linears
    assert all(not torch.equal(b, p) for b, p in zip(before, step.params))


def test_interleaving_alternates_blocks_and_flips_order() -> None:
    from slt.bench.search import interleaved

    calls: list[str] = []
    timer = Timer("cpu")
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                        steps=5, warmup=1, block=2, timer=timer)
    assert calls == ["a", "b", "a", "a", "b", "b", "b", "b", "a", "a", "a", "b"]
    assert [len(times["a"]), len(times["b"])] == [5, 5]
    assert all(t > 0 for t in times["a"] + times["b"])


def test_search_side_is_search_step(monkeypatch) -> None:
    from slt.bench import search as bench_search
    from slt.engine.loop import Search

    seen: list[int] = []
    real = Search.step

    def counted(self, x, y, global_n):
        seen.append(global_n)
        assert self.amp_dtype is None and not self.channels_last
        return real(self, x, y, global_n)

    monkeypatch.setattr(bench_search.Search, "step", counted)
    row = bench_search.bench_one("mlp", (1, 4, 4), bench_search.Mode(), 8, 0.5, 0.5, "cpu",
                                 steps=3, warmup=2, block=1, overrides=["model.hidden=[8]"])
    assert seen == [8] * 5
    assert row["n_prunable"] == 16 * 8 + 8 * 10 and row["n_source"] == 104
    assert row["n_ticket"] == 52 and row["dense_trained_params"] == 208


def test_bench_search_cli_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "search.json"
    threads = torch.get_num_threads()
    assert main(["bench", "search", "--model", "mlp", "conv2", "--set", "model.width=0.25",
                 "--input", "8", "--batch", "16", "--steps", "2", "--warmup", "1",
                 "--device", "cpu", "--threads", str(threads), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["threads"] == threads
    assert data["keep"] == 0.5 and data["source_density"] == 1.0
    rows = data["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [
        ("mlp", "fp32"), ("mlp", "bf16"), ("conv2", "fp32"), ("conv2", "bf16")]
    for r in rows:
        assert r["input"] == "3x8x8" and r["batch"] == 16 and r["steps"] == 2
        assert len(r["search_step_ms"]) == 2 and len(r["dense_step_ms"]) == 2
        assert 0 < r["ratio"] < float("inf")
        assert r["ratio"] == pytest.approx(r["search_ms"] / r["dense_ms"])
        assert r["search_images_per_s"] == pytest.approx(16 / r["search_ms"] * 1e3)
        assert r["dense_images_per_s"] == pytest.approx(16 / r["dense_ms"] * 1e3)
        # a dense source; keep 0.5 rounded per layer (at most 5 layers here)
        assert r["n_source"] == r["n_prunable"] == r["dense_trained_params"]
        assert abs(r["n_ticket"] - r["n_source"] / 2) <= 2.5
    printed = capsys.readouterr().out
    assert "conv2 3x8x8 batch 16: fastest search in" in printed and "wrote" in printed


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet7"], "unknown model 'resnet7'"),
    (["--modes", "bf16+fast"], "unknown flag 'fast'"),
    (["--modes", "int8"], "mode 'int8': starts with a precision"),
    (["--input", "0"], "--input '0'"),
    (["--model", "conv8", "--input", "8"], "model conv8 needs images of at least 16x16"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--keep", "1.5"], "search.keep must be in (0, 1]"),
    (["--set", "run.precision=bf16"], "--set run.precision: the bench sets it from --modes"),
])
def test_bench_search_rejects_bad_input(capsys, args: list[str], message: str) -> None:
    assert main(["bench", "search", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("slt: error: ") and message in err
