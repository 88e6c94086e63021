"""Scoring rules. Each rule is one file that registers a `Scorer` subclass by name."""

from slt.scorers import edge_popup  # noqa: F401  (registers edge-popup)
from slt.scorers.base import Budget, Scorer, StraightThroughTopK
from slt.scorers.registry import SCORERS

__all__ = ["SCORERS", "Budget", "Scorer", "StraightThroughTopK", "create_scorer"]


def create_scorer(name: str) -> Scorer:
    return SCORERS.get(name)()
