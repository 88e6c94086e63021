"""One run: where it executes, whether it fits, the search loop, checkpoints, TensorBoard."""

from slt.engine.loop import SearchResult
from slt.engine.measure import evaluate
from slt.engine.platform import Platform
from slt.engine.run import run_search

__all__ = ["Platform", "SearchResult", "evaluate", "run_search"]
