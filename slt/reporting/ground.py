"""The report's ground-truth tables: how much of a planted ticket the source kept and the
search found, and the density a ticket really uses (edges on an input-to-output path)
against its nominal density. Both read summary.json only."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from slt.analysis import fmt_pct, mean_std
from slt.errors import SltError
from slt.fileio import atomic_write_text
from slt.reporting.runs import Run, json_or_none
from slt.reporting.studies import Study, label_of
from slt.reporting.tables import Evaluator, ticket_digest

# (column, how a run's summary gives it): the planted section's figures, in order
PLANT_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("planted edges in source", lambda s: s["plant"]["survival"]),
    ("recall", lambda s: s["plant"]["recall"]),
    ("chance recall", lambda s: s["plant"].get("chance_recall")),
    ("recall of those in source", lambda s: s["plant"]["recall_in_source"]),
    ("precision", lambda s: s["plant"]["precision"]),
    ("plant in source, no search (acc)", lambda s: s["plant"]["accuracy_in_source"]),
    ("found ticket (acc)", lambda s: s["final_test_acc"]),
)


def _planted(run: Run) -> bool:
    return run.summary is not None and "plant" in run.summary


def plant_table(study: Study) -> tuple[list[str], list[list[str]], dict] | None:
    """Rows: each setting (seed aside) at each source density; columns: the plant's
    survival in the source, the ticket's recall and precision of it, the plant's own
    accuracy inside the source and the ticket's. None when no run has a plant."""
    by: dict[tuple, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for key, group in study.groups().items():
        for r in group:
            if _planted(r):
                by[key][r.density].append(r)
    if not by:
        return None
    header = ["setting", "d", *[name for name, _ in PLANT_COLUMNS]]
    rows, series = [], {}
    for key in sorted(by, key=str):
        for d in sorted(by[key], reverse=True):
            cells = {name: [v for r in by[key][d] if (v := get(r.summary)) is not None]
                     for name, get in PLANT_COLUMNS}
            rows.append([label_of(key), f"{d:g}", *[fmt_pct(v) for v in cells.values()]])
            series.setdefault(key, {})[d] = cells
    return header, rows, series


EFFECTIVE_CACHE = "effective.json"


def _effective(run: Run, study: Study, evaluator: Evaluator) -> tuple[float, float] | None:
    """(effective, nominal) ticket density of a run: from its summary, or for a run of an
    older slt measured on its ticket (cached in the run directory like the survival
    figures, keyed by the ticket file's digest); None when neither can be had."""
    s = run.summary or {}
    if "effective_density" in s:
        return s["effective_density"], s["ticket_density"]
    cache_path, digest = run.path / EFFECTIVE_CACHE, ticket_digest(run)
    cached = json_or_none(cache_path) or {}
    if (digest is not None and cached.get("ticket") == digest
            and {"effective_density", "ticket_density"} <= cached.keys()):
        return cached["effective_density"], cached["ticket_density"]
    ticket = study.ticket(run)
    records = None if ticket is None or digest is None else evaluator.effective(ticket)
    if records is None:
        return None
    pair = records["effective_density"], records["effective"]["ticket"]["nominal_density"]
    try:  # a cache: a report that cannot write it (read-only runs) still reports
        atomic_write_text(cache_path, json.dumps(
            {"ticket": digest, "effective_density": pair[0], "ticket_density": pair[1]},
            indent=2) + "\n")
    except (OSError, SltError):
        pass
    return pair


def effective_table(study: Study, evaluator: Evaluator
                    ) -> tuple[list[str], list[list[str]], dict, bool] | None:
    """Rows: settings; columns: source densities; cells: effective / nominal ticket
    density in percent of the prunable weights (mean over seeds), and whether any ticket
    uses fewer edges than it holds. None when no run has it."""
    densities = study.densities()
    header = ["setting", *[f"d={d:g}" for d in densities]]
    rows, series, differs = [], {}, False
    known: dict[Any, tuple[float, float] | None] = {}  # a dense run stands in many groups
    for key, runs in study.groups().items():
        pairs: dict[float, list[tuple[float, float]]] = defaultdict(list)
        for r in runs:
            if r.path not in known:
                known[r.path] = _effective(r, study, evaluator)
            pair = known[r.path]
            if pair is not None:
                pairs[r.density].append(pair)
                differs |= pair[0] < pair[1] * (1 - 1e-9)
        if not pairs:
            continue
        cells = []
        for d in densities:
            if not pairs.get(d):
                cells.append("–")
                continue
            eff = mean_std([e for e, _ in pairs[d]])[0]
            nominal = mean_std([n for _, n in pairs[d]])[0]
            cells.append(f"{100 * eff:.3g} / {100 * nominal:.3g}")
        rows.append([label_of(key), *cells])
        series[key] = {d: [e / n if n else 0.0 for e, n in v] for d, v in pairs.items()}
    return (header, rows, series, differs) if rows else None
