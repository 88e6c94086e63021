"""Runs grouped into studies: which settings vary, how a run is labelled, and which runs
differ only by source density (one survival curve each)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slt.analysis import THEORY, theory_width
from slt.reporting.runs import (
    ANY,
    ANY_WHEN_DENSE,
    DENSITY,
    SCHEME,
    SEED,
    WIDTH,
    Run,
    load_ticket_of,
)


def varying_keys(runs: Iterable[Run]) -> list[str]:
    """Keys with more than one value among the runs (a dense run's scheme 'any' matches
    every scheme, so one scheme plus dense runs is not a varying scheme; so for
    plant.in_source)."""
    runs = list(runs)
    values: dict[str, set] = defaultdict(set)
    for k in {k for r in runs for k in r.settings}:
        for r in runs:
            v = r.settings.get(k)  # a key a run lacks (keep vs ticket_density) counts as None
            if not (k in ANY_WHEN_DENSE and v == ANY):
                values[k].add(v)
    return sorted(k for k, vs in values.items() if len(vs) > 1)


def stands_for(run: Run, key: tuple) -> bool:
    """Whether a run belongs to the group `key`: its own values, where a dense run (scheme
    and plant.in_source 'any') stands for every scheme and either plant.in_source, and a
    width-1 run at a density whose theory width is 1 stands for width 'theory' too."""
    for k, v in key:
        rv = run.settings.get(k)
        if rv == v or (k in ANY_WHEN_DENSE and rv == ANY):
            continue
        if (k == WIDTH and v == THEORY and run.config.model.width == 1.0
                and theory_width(run.density) == 1.0):
            continue
        return False
    return True


def group_runs(runs: Iterable[Run], keys: list[str]) -> dict[tuple, list[Run]]:
    """Runs by their values of `keys`, each run in every group it stands for; a group whose
    runs all belong to other groups too (the dense runs' own 'any' group) is dropped."""
    runs = list(runs)
    out: dict[tuple, list[Run]] = {}
    for g in sorted({key_of(r, keys) for r in runs}, key=str):
        out[g] = [r for r in runs if stands_for(r, g)]
    for g in list(out):
        others = [h for h in out if h != g]
        if all(any(r in out[h] for h in others) for r in out[g]):
            del out[g]
    return out


def key_of(run: Run, keys: Iterable[str]) -> tuple:
    return tuple((k, run.settings.get(k)) for k in keys)


def label_of(key: tuple) -> str:
    short = {"search.ticket_density": "t", "search.keep": "keep", WIDTH: "width",
             SCHEME: "scheme", "search.scorer": "scorer", "model.name": "model",
             "data.name": "data", "search.scope": "scope", "model.kwargs": "kwargs",
             "model.bias": "bias", "model.norm": "norm", "plant.in_source": "plant in source"}
    # a model key that one kind of model lacks (a built-in's kwargs): not part of its label
    shown = [(k, v) for k, v in key if not (v is None and k.startswith("model."))]
    return ", ".join(f"{short.get(k, k)}={v:g}" if isinstance(v, float) else
                     f"{short.get(k, k)}={v}" for k, v in shown) or "all runs"


@dataclass
class Study:
    """Runs grouped for comparison: a group is every setting but density and seed."""

    runs: list[Run]
    varying: list[str]
    _tickets: dict[Path, Any] = field(default_factory=dict, repr=False)
    ticket_errors: dict[Path, str] = field(default_factory=dict, repr=False)

    def ticket(self, run: Run) -> Any:
        """The run's ticket, read once per report (a dense run's serves many pairs and
        groups); None when it is missing or unreadable (why: in `ticket_errors`, for the
        report's notes, so a table never loses a run silently)."""
        if run.path not in self._tickets:
            self._tickets[run.path], problem = load_ticket_of(run)
            if problem:
                self.ticket_errors[run.path] = problem
        return self._tickets[run.path]

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.status == "finished"]

    def group_keys(self, exclude: tuple[str, ...] = (DENSITY, SEED)) -> list[str]:
        return [k for k in self.varying if k not in exclude]

    def groups(self, exclude: tuple[str, ...] = (DENSITY, SEED)) -> dict[tuple, list[Run]]:
        return group_runs(self.finished, self.group_keys(exclude))

    def densities(self) -> list[float]:
        return sorted({r.density for r in self.finished}, reverse=True)
