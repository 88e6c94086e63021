"""`slt report RUNS_DIR`: tables and plots from run directories, and nothing else.

It reads each run's config.toml, summary.json (finished), metrics.jsonl (still running) or
error.json (failed), and ticket.slt, so it works while a sweep runs and on another machine.
It writes report.md, results.csv and PNG plots (with matplotlib; without it, tables only).

Runs are compared on the config keys that vary among them. At source density 1 every
scheme builds the same dense source, so a dense run serves as the reference of every scheme.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Collection
from typing import Any

from slt.analysis import (
    THEORY,
    fmt_pct,
    jaccard,
    mean_std,
    surviving,
    surviving_fraction,
    theory_width,
)
from slt.config.ids import config_hash
from slt.errors import SltError
from slt.fileio import atomic_write_text
from slt.reporting.runs import ANY_WHEN_DENSE, DENSITY, SEED, WIDTH, Run, json_or_none
from slt.reporting.studies import Study, key_of, label_of


def accuracy_table(study: Study) -> tuple[list[str], list[list[str]], dict[tuple, dict]]:
    """Rows: groups; columns: source densities; cells: test accuracy mean ± std over seeds."""
    densities = study.densities()
    header = ["setting", *[f"d={d:g}" for d in densities]]
    rows, series = [], {}
    for key, runs in study.groups().items():
        by_d: dict[float, list[float]] = defaultdict(list)
        for r in runs:
            by_d[r.density].append(r.acc)
        rows.append([label_of(key), *[fmt_pct(by_d.get(d, [])) for d in densities]])
        series[key] = by_d
    return header, rows, series


def ticket_digest(run: Run) -> str | None:
    """The ticket file's own SHA-256 (its last 32 bytes): identifies its contents cheaply."""
    try:
        with open(run.path / "ticket.slt", "rb") as fh:
            fh.seek(-32, os.SEEK_END)
            return fh.read(32).hex()
    except OSError:
        return None


def _searched_masks(ticket: Any) -> tuple[list, list]:
    layers = [tl for tl in ticket.layers if tl.searched]
    return [tl.mask for tl in layers], [tl.source_mask for tl in layers]


class Evaluator:
    """Test accuracy of a dense run's network restricted to a set of masks; data is loaded
    once per dataset. Reports once why it cannot evaluate (no data here, say)."""

    def __init__(self, enabled: bool, note: Callable[[str], None],
                 trust_model: bool | Collection[str] = False):
        self.enabled = enabled
        self.trust_model = trust_model  # True, or the model names trusted
        self.note = note
        self.failed: set[str] = set()  # datasets that could not be loaded here
        self.unbuilt: set[str] = set()  # models whose tickets could not be rebuilt here
        self._data: dict[str, Any] = {}

    def __call__(self, dense_ticket: Any, masks: list) -> float | None:
        if not self.enabled:
            return None
        import torch

        from slt.data.loader import open_batches
        from slt.engine.measure import evaluate
        from slt.engine.platform import resolve_device

        cfg = dense_ticket.config
        if os.environ.get("SLT_DATA"):
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, root=os.environ["SLT_DATA"]))
        device = resolve_device("auto")
        name = repr(cfg.data)
        if name in self.failed:
            return None
        try:
            if name not in self._data:
                self._data[name] = open_batches(cfg.data, device)
        except SltError as exc:
            self.failed.add(name)
            self.note(f"surviving tickets were not evaluated: {exc}")
            return None
        net = self._rebuild(dense_ticket, device, "surviving tickets were not evaluated")
        if net is None:
            return None
        dense_sources = _searched_masks(dense_ticket)[1]
        compact = [m.reshape(-1)[s.reshape(-1)] for m, s in zip(masks, dense_sources)]
        net.fix_masks([c.to(device) for c in compact])
        with torch.no_grad():
            return evaluate(net, self._data[name], cfg.search.eval_batch_size)[1]

    def _rebuild(self, ticket: Any, device: Any, what: str) -> Any:
        """The ticket's network, or None (`what` was not done, and why: noted once per
        model)."""
        from slt import ticket as ticket_io

        model = ticket.config.model.name
        if model in self.unbuilt:
            return None
        trusted = self.trust_model is True or (
            not isinstance(self.trust_model, bool) and model in self.trust_model)
        try:
            return ticket_io.rebuild(ticket, device, trusted)
        except SltError as exc:
            self.unbuilt.add(model)  # said once per model
            self.note(f"{what}: {exc}")
            return None

    def effective(self, ticket: Any) -> dict[str, Any] | None:
        """Effective-density records of a ticket whose run did not record them (an older
        slt's), measured on its rebuilt network; None when evaluation is off or it cannot
        be rebuilt here."""
        if not self.enabled:
            return None
        import torch

        from slt.engine.measure import measured_effective

        what = "effective densities were not measured"
        net = self._rebuild(ticket, torch.device("cpu"), what)
        if net is None:
            return None
        records = measured_effective(net, ticket.compact_masks(),
                                     ticket.header["spec"]["shape"])
        if "effective_error" in records:
            self.note(f"{what} for a ticket of {ticket.config.model.name}: "
                      f"{records['effective_error']}")
            return None
        return records


def survival_rows(study: Study, evaluator: Evaluator) -> list[dict[str, Any]]:
    """Per sparse run with a dense counterpart (same settings and seed, density 1): the
    fraction of the dense ticket's edges in its source, the accuracy of that surviving part
    (no new search, cached in the sparse run's folder), and its own re-searched accuracy."""
    match = [k for k in study.varying if k not in (DENSITY, *ANY_WHEN_DENSE)]
    dense = {key_of(r, match): r for r in study.finished if r.density >= 1.0}
    out = []
    for r in study.finished:
        if r.density >= 1.0:
            continue
        d_run = dense.get(key_of(r, match))
        if d_run is None:
            continue
        cache = r.path / f"survival-{config_hash(d_run.config)}.json"
        digests = [ticket_digest(d_run), ticket_digest(r)]
        if None in digests:
            continue
        cached = json_or_none(cache) or {}
        if cached.get("tickets") != digests:
            cached = {}  # either ticket changed since (a rerun): compute again
        if "fraction" not in cached or ("surviving_acc" not in cached and evaluator.enabled):
            dt, st = study.ticket(d_run), study.ticket(r)
            if dt is None or st is None:
                continue
            d_masks, _ = _searched_masks(dt)
            s_masks, s_sources = _searched_masks(st)
            cached = {"dense_run": d_run.path.name, "tickets": digests,
                      "fraction": surviving_fraction(d_masks, s_sources),
                      "jaccard": jaccard(d_masks, s_masks)}
            acc = evaluator(dt, surviving(d_masks, s_sources))
            if acc is not None:
                cached["surviving_acc"] = acc
            try:  # a cache: a report that cannot write it (read-only runs) still reports
                atomic_write_text(cache, json.dumps(cached, indent=2) + "\n")
            except (OSError, SltError):
                pass
        out.append({"run": r, "dense": d_run, **cached})
    return out


def survival_table(study: Study, rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]],
                                                                      dict[tuple, dict]]:
    keys = study.group_keys()
    by: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by[key_of(row["run"], keys)][row["run"].density].append(row)
    header = ["setting", "d", "accuracy retained", "dense-ticket edges in source",
              "surviving part, no search", "searched again", "dense ticket (d=1)",
              "Jaccard(dense, new ticket)"]
    table, series = [], {}
    for key in sorted(by, key=str):
        series[key] = {}
        for d in sorted(by[key], reverse=True):
            rs = by[key][d]
            dense_acc = [x["dense"].acc for x in rs]
            new_acc = [x["run"].acc for x in rs]
            retained = [a / b for a, b in zip(new_acc, dense_acc) if b]
            surv = [x["surviving_acc"] for x in rs if "surviving_acc" in x]
            frac = [x["fraction"] for x in rs]
            series[key][d] = {"retained": retained, "fraction": frac, "surviving": surv,
                              "searched": new_acc, "dense": dense_acc}
            table.append([label_of(key), f"{d:g}", fmt_pct(retained), fmt_pct(frac),
                          fmt_pct(surv), fmt_pct(new_acc), fmt_pct(dense_acc),
                          fmt_pct([x["jaccard"] for x in rs])])
    return header, table, series


def overlap_tables(study: Study) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per group: mean Jaccard overlap of the tickets found at each pair of densities from
    the same seed (and the same width: tickets of different widths do not overlap)."""
    def ticket_masks(r: Run) -> list | None:
        t = study.ticket(r)
        return None if t is None else _searched_masks(t)[0]

    out = []
    for key, runs in study.groups().items():
        if (WIDTH, THEORY) in key:
            continue  # widths differ from density to density: nothing to overlap
        by_seed: dict[Any, dict[float, Run]] = defaultdict(dict)
        for r in runs:
            by_seed[(r.settings.get(SEED), r.config.source.seed)][r.density] = r
        densities = sorted({r.density for r in runs}, reverse=True)
        if len(densities) < 2:
            continue
        rows = []
        for a in densities:
            cells = []
            for b in densities:
                pairs = [(ticket_masks(s[a]), ticket_masks(s[b])) for s in by_seed.values()
                         if a in s and b in s
                         and s[a].config.model.width == s[b].config.model.width]
                vals = [jaccard(x, y) for x, y in pairs if x is not None and y is not None]
                cells.append(f"{mean_std(vals)[0]:.3f}" if vals else "–")
            rows.append([f"d={a:g}", *cells])
        out.append((label_of(key), ["", *[f"d={d:g}" for d in densities]], rows))
    return out


def width_table(study: Study) -> tuple[list[str], list[list[str]], dict[tuple, dict]] | None:
    """Accuracy vs width multiplier per density; the theory's factor w(d) in its own column,
    and a * on the width that equals it."""
    if WIDTH not in study.varying:
        return None
    widths = sorted({r.config.model.width for r in study.finished})
    by: dict[tuple, dict[float, dict[float, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for key, runs in study.groups((DENSITY, SEED, WIDTH)).items():
        for r in runs:
            by[key][r.density][r.config.model.width].append(r.acc)
    header = ["setting", "d", "theory w(d)", *[f"w={w:g}" for w in widths]]
    rows, series = [], {}
    for key in sorted(by, key=str):
        for d in sorted(by[key], reverse=True):
            theory = round(theory_width(d), 4)
            cells = [fmt_pct(by[key][d].get(w, [])) + ("*" if math.isclose(w, theory) else "")
                     for w in widths]
            rows.append([label_of(key), f"{d:g}", f"{theory:g}", *cells])
            series[(key, d)] = by[key][d]
    return header, rows, series


def layer_profiles(study: Study) -> dict[tuple, dict[float, list[tuple[str, float]]]]:
    """group -> density -> [(layer, d_l)] from the runs' summaries, one profile per group of
    the settings that vary (seed aside), at the narrowest width in a width study."""
    keys = study.group_keys((DENSITY, SEED, WIDTH))
    narrowest: dict[tuple, float] = {}
    for r in study.finished:
        k = key_of(r, keys)
        narrowest[k] = min(narrowest.get(k, math.inf), r.config.model.width)
    out: dict[tuple, dict[float, list[tuple[str, float]]]] = defaultdict(dict)
    for r in study.finished:
        assert r.summary is not None
        k = key_of(r, keys)
        if r.density >= 1.0 or r.config.model.width != narrowest[k]:
            continue
        named = () if "model.name" in keys else (("model", r.config.model.name),)
        label = (*k, *named, (WIDTH, r.config.model.width))
        out[label][r.density] = [
            (f"{row['name']} ({'×'.join(str(n) for n in row.get('shape', []))})",
             row["source_density"]) for row in r.summary["layers"]]
    return dict(out)


def profile_table(profiles: dict[tuple, dict[float, list[tuple[str, float]]]]) -> str:
    """Per group of `layer_profiles`: a layer-by-density table of the layers' source densities."""
    parts = []
    for key, by_d in sorted(profiles.items(), key=str):
        densities = sorted(by_d, reverse=True)
        names = list(dict.fromkeys(n for d in densities for n, _ in by_d[d]))
        rows = [[name, *[f"{dict(by_d[d])[name]:.3f}" if name in dict(by_d[d]) else "–"
                         for d in densities]] for name in names]
        parts += [f"**{label_of(key)}**\n",
                  markdown_table(["layer", *[f"d={d:g}" for d in densities]], rows)]
    return "\n".join(parts)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
