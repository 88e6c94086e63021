"""Scoring rules. Each rule is one file that registers a `Scorer` subclass by name; other
packages add rules through the `slt.scorers` entry-point group (see docs/scorers.md)."""

from slt.scorers.base import Budget, EpochContext, Scorer, StraightThroughTopK, topk_masks
from slt.scorers.lookup import create_scorer, scorer_class, scorer_options
from slt.scorers.registry import SCORERS

__all__ = ["SCORERS", "Budget", "EpochContext", "Scorer", "StraightThroughTopK",
           "create_scorer", "scorer_class", "scorer_options", "topk_masks"]
