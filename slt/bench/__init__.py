"""Benchmarks: `slt bench topk` (the mask op) and `slt bench search` (search steps)."""

from slt.bench.search import run_search_bench
from slt.bench.topk import run_topk_bench

__all__ = ["run_search_bench", "run_topk_bench"]
