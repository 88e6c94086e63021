"""The top-k benchmark's variants compute the same masks (up to ties) and report sane rows."""

from __future__ import annotations

import torch

from slt.bench import bench_topk, layer_sizes, ours, sort_per_layer, topk_per_layer


def test_layer_sets_match_the_models() -> None:
    assert layer_sizes("lenet-300-100") == [784 * 300, 300 * 100, 100 * 10]


def test_variants_agree_on_distinct_scores() -> None:
    g = torch.Generator().manual_seed(0)
    # sizes where the reference's int() and our round-half-up agree on k
    scores = [torch.randn(n, generator=g) for n in (1000, 40, 4096)]
    for keep in (0.5, 0.1):
        a, b, c = (f(scores, keep) for f in (sort_per_layer, topk_per_layer, ours))
        for x, y, z in zip(a, b, c):
            assert torch.equal(x, y) and torch.equal(y, z)


def test_rows(tmp_path) -> None:
    rows = bench_topk(["lenet-300-100"], [0.5], repeats=2)
    assert [r["variant"] for r in rows] == ["sort per layer (edge-popup)", "torch.topk per layer",
                                            "slt.topk"]
    assert rows[0]["speedup_vs_sort"] == 1.0
    assert all(r["median_ms"] > 0 and r["n"] == 266200 for r in rows)
