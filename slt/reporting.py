"""`slt report RUNS_DIR`: tables and plots from run directories, and nothing else.

It reads each run's config.toml, summary.json (finished), metrics.jsonl (still running) or
error.json (failed), and ticket.slt, so it works while a sweep runs and on another machine.
It writes report.md, results.csv and PNG plots (with matplotlib; without it, tables only).

Runs are compared on the config keys that vary among them. At source density 1 every
scheme builds the same dense source, so a dense run serves as the reference of every scheme.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slt.analysis import fmt_pct, jaccard, mean_std, surviving, surviving_fraction
from slt.config import (
    NOT_HASHED,
    Config,
    config_hash,
    config_hashes,
    dense_source,
    from_dict,
    read_toml,
)
from slt.errors import SltError, StorageError
from slt.fileio import atomic_write_text, output_dir, output_file
from slt.rundir import (
    CONFIG,
    ERROR,
    METRICS,
    RUN_FILES,
    holder_alive,
    read_json,
    read_metrics,
    read_summary,
)
from slt.sweeps import THEORY, theory_width

ANY = "any"  # the scheme of a dense (d = 1) run
DENSITY, SEED, SCHEME, WIDTH = "source.density", "run.seed", "source.scheme", "model.width"


@dataclass
class Run:
    path: Path
    config: Config
    status: str  # finished, running, interrupted (its process is gone: rerun it) or failed
    acc: float | None  # final test accuracy (last epoch's while running)
    epochs_done: int
    error: str
    summary: dict[str, Any] | None
    settings: dict[str, Any]

    @property
    def density(self) -> float:
        return self.config.source.density


def raw_settings(cfg: Config) -> dict[str, Any]:
    """The config keys that say what a run computes, flattened, as the run used them."""
    out: dict[str, Any] = {}
    for section, body in cfg.to_dict().items():
        for key, value in body.items():
            if (section, key) in NOT_HASHED or (section, key) in (("search", "keep"),
                                                                  ("search", "ticket_density")):
                continue
            if isinstance(value, dict):  # a rule with options: "iterand(rate=0.2)"
                value = value["name"] + "(" + ", ".join(
                    f"{k}={v}" for k, v in value.items() if k != "name") + ")"
            out[f"{section}.{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def settings_of(cfg: Config) -> dict[str, Any]:
    """`raw_settings` for comparing runs: the ticket size as the run gave it (keep or
    absolute density), the scheme of a dense run as 'any', a theory width as 'theory'."""
    out = raw_settings(cfg)
    # The ticket size as the run set it: a fixed keep (a fraction of the source) compares
    # across densities as it is; otherwise the absolute ticket density.
    if cfg.search.keep is not None:
        out["search.keep"] = round(cfg.search.keep, 6)
    else:
        out["search.ticket_density"] = round(cfg.ticket_density, 6)
    if dense_source(cfg):
        out[SCHEME] = ANY
    d, w = cfg.source.density, cfg.model.width
    if d < 1.0 and w != 1.0 and math.isclose(w, round(theory_width(d), 4)):
        out[WIDTH] = THEORY  # a sweep's model.width = "theory" point
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    return read_json(path)[0]


@dataclass(frozen=True)
class Unreadable:
    """A run directory the report could not use, and why (listed, never dropped silently)."""

    path: Path
    reason: str


def load_run(path: Path) -> Run | Unreadable | None:
    """A run directory's state, `Unreadable` with the reason when its files are damaged or
    cannot be read, or None for a folder that is not a run directory."""
    try:
        if not any((path / name).exists() for name in RUN_FILES):
            return None
        return _load_run(path)
    except OSError as exc:  # a folder or file this user may not read, say
        return Unreadable(path, f"{exc.filename or path}: {exc.strerror or exc}")


def _load_run(path: Path) -> Run | Unreadable:
    if not (path / CONFIG).is_file():
        return Unreadable(path, f"{CONFIG} is missing")
    try:  # the run's own resolved config: readable without the plug-ins it names
        cfg = from_dict(read_toml(path / CONFIG), str(path / CONFIG))
    except SltError as exc:  # damaged
        return Unreadable(path, str(exc))
    except UnicodeDecodeError as exc:
        return Unreadable(path, f"{CONFIG} is not UTF-8 text ({exc.reason})")
    summary, problem = read_summary(path, config_hashes(cfg))
    if problem:
        repair = "" if "cannot be read" in problem else \
            "; rerun its search to rebuild it from the checkpoint"
        return Unreadable(path, problem + repair)
    error, problem = read_json(path / ERROR)
    if problem:
        return Unreadable(path, problem)
    rows, _ = read_metrics(path / METRICS)  # a line cut short by a live writer is no fault
    if summary is not None:
        status, acc, done = "finished", summary["final_test_acc"], summary["epochs"]
    elif error is not None:
        status, acc, done = "failed", None, len(rows)
    else:  # nobody's lock on it any more: a killed or interrupted run, not a running one
        status = "interrupted" if holder_alive(path) is False else "running"
        done = len(rows)
        acc = rows[-1]["test_acc"] if rows else None
    return Run(path, cfg, status, acc, done, str((error or {}).get("error", "")), summary,
               settings_of(cfg))


def load_runs(root: str | os.PathLike[str]) -> tuple[list[Run], list[Unreadable]]:
    """The run directories directly under `root`, and those that could not be read."""
    root = Path(root)
    if not root.is_dir():
        raise SltError(f"no such folder of runs: {root}")
    runs: list[Run] = []
    unreadable: list[Unreadable] = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and (r := load_run(p)) is not None:
            (runs if isinstance(r, Run) else unreadable).append(r)
    if not runs and not unreadable:
        raise SltError(f"{root} holds no run directories (folders with a config.toml)")
    return runs, unreadable


def varying_keys(runs: Iterable[Run]) -> list[str]:
    """Keys with more than one value among the runs (a dense run's scheme 'any' matches
    every scheme, so one scheme plus dense runs is not a varying scheme)."""
    runs = list(runs)
    values: dict[str, set] = defaultdict(set)
    for k in {k for r in runs for k in r.settings}:
        for r in runs:
            v = r.settings.get(k)  # a key a run lacks (keep vs ticket_density) counts as None
            if not (k == SCHEME and v == ANY):
                values[k].add(v)
    return sorted(k for k, vs in values.items() if len(vs) > 1)


def stands_for(run: Run, key: tuple) -> bool:
    """Whether a run belongs to the group `key`: its own values, where a dense run (scheme
    'any') stands for every scheme and a width-1 run at a density whose theory width is 1
    stands for width 'theory' too."""
    for k, v in key:
        rv = run.settings.get(k)
        if rv == v or (k == SCHEME and rv == ANY):
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
             "data.name": "data", "search.scope": "scope"}
    return ", ".join(f"{short.get(k, k)}={v:g}" if isinstance(v, float) else
                     f"{short.get(k, k)}={v}" for k, v in key) or "all runs"


# --- the study tables ----------------------------------------------------------------------


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
            self._tickets[run.path], problem = _load_ticket(run)
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


# --- survival: the dense ticket inside sparser sources --------------------------------------


def _load_ticket(run: Run) -> tuple[Any, str]:
    """The run's ticket and "", or None and why it cannot be read."""
    from slt import ticket as ticket_io

    try:
        return ticket_io.load(run.path / "ticket.slt"), ""
    except SltError as exc:
        return None, str(exc)


def _ticket_digest(run: Run) -> str | None:
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

    def __init__(self, enabled: bool, note: Callable[[str], None]):
        self.enabled = enabled
        self.note = note
        self.failed: set[str] = set()  # datasets that could not be loaded here
        self._data: dict[str, Any] = {}

    def __call__(self, dense_ticket: Any, masks: list) -> float | None:
        if not self.enabled:
            return None
        import torch

        from slt import ticket as ticket_io
        from slt.data import open_batches
        from slt.engine import evaluate
        from slt.platform import resolve_device

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
            net = ticket_io.rebuild(dense_ticket, device)
        except SltError as exc:
            self.failed.add(name)
            self.note(f"surviving tickets were not evaluated: {exc}")
            return None
        dense_sources = _searched_masks(dense_ticket)[1]
        compact = [m.reshape(-1)[s.reshape(-1)] for m, s in zip(masks, dense_sources)]
        net.fix_masks([c.to(device) for c in compact])
        with torch.no_grad():
            return evaluate(net, self._data[name], cfg.search.eval_batch_size)[1]


def survival_rows(study: Study, evaluator: Evaluator) -> list[dict[str, Any]]:
    """Per sparse run with a dense counterpart (same settings and seed, density 1): the
    fraction of the dense ticket's edges in its source, the accuracy of that surviving part
    (no new search, cached in the sparse run's folder), and its own re-searched accuracy."""
    match = [k for k in study.varying if k not in (DENSITY, SCHEME)]
    dense = {key_of(r, match): r for r in study.finished if r.density >= 1.0}
    out = []
    for r in study.finished:
        if r.density >= 1.0:
            continue
        d_run = dense.get(key_of(r, match))
        if d_run is None:
            continue
        cache = r.path / f"survival-{config_hash(d_run.config)}.json"
        digests = [_ticket_digest(d_run), _ticket_digest(r)]
        if None in digests:
            continue
        cached = _read_json(cache) or {}
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
        label = (*k, ("model", r.config.model.name), (WIDTH, r.config.model.width))
        out[label][r.density] = [
            (f"{row['name']} ({'×'.join(str(n) for n in row.get('shape', []))})",
             row["source_density"]) for row in r.summary["layers"]]
    return dict(out)


# --- writing -------------------------------------------------------------------------------


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["run_id", "status", "epochs_done", "final_test_acc", "best_test_acc", "time_s",
              "source_density_actual", "ticket_density_actual", "keep_actual", "error"]


def write_csv(path: Path, runs: list[Run], unreadable: list[Unreadable] = ()) -> None:
    """One row per run directory; an unreadable one has its reason in `error`."""
    raw = [raw_settings(r.config) for r in runs]
    keys = sorted({k for x in raw for k in x})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*CSV_FIELDS, "search.keep", "search.ticket_density", *keys])
    for r, values in zip(runs, raw):
        s = r.summary or {}
        w.writerow([r.path.name, r.status, r.epochs_done, r.acc, s.get("best_test_acc"),
                    s.get("time_s"), s.get("source_density"), s.get("ticket_density"),
                    s.get("keep"), r.error, r.config.search.keep,
                    r.config.search.ticket_density, *[values.get(k) for k in keys]])
    for u in unreadable:
        w.writerow([u.path.name, "unreadable", *[None] * (len(CSV_FIELDS) - 3), u.reason,
                    *[None] * (2 + len(keys))])
    atomic_write_text(path, buf.getvalue())


def report_folder(out: str | os.PathLike[str], run_dirs: list[Path]) -> Path:
    """The report's folder, created when missing, once it is safe to write: a folder (not a
    file, device or FIFO), not inside a run directory it reports, and where report.md,
    results.csv and every PNG are new or regular files outside the run directories (a
    symlink among them is written through, its link kept). Else one StorageError line."""
    out_dir = output_dir(out, name="report folder")
    real = Path(os.path.realpath(out_dir))
    for run_dir in run_dirs:
        if real.is_relative_to(os.path.realpath(run_dir)):
            raise StorageError(f"cannot use {os.fspath(out)} as the report folder: it is "
                               f"inside the run directory {run_dir}, which the report reads")
    for name in ("report.md", "results.csv", *sorted(p.name for p in out_dir.glob("*.png"))):
        output_file(out_dir / name, run_dirs)
    return out_dir


def write_report(runs_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 evaluate_survival: bool = True, log: Callable[[str], None] = print) -> Path:
    """Write report.md, results.csv and plots; returns the report.md path. The folder and
    every file in it are checked before anything is written (`report_folder`)."""
    runs, unreadable = load_runs(runs_dir)
    out_dir = report_folder(Path(runs_dir) / "report" if out is None else out,
                            [r.path for r in (*runs, *unreadable)])
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        log(text)

    for u in unreadable:
        log(f"unreadable run directory {u.path}: {u.reason}")

    study = Study(runs, varying_keys(runs))
    fin = study.finished
    running = [r for r in runs if r.status in ("running", "interrupted")]
    stopped = sum(r.status == "interrupted" for r in runs)
    failed = [r for r in runs if r.status == "failed"]
    md = [f"# slt report: {Path(runs_dir).name}\n",
          f"{len(runs) + len(unreadable)} run directories: {len(fin)} finished, "
          f"{len(running) - stopped} running, "
          + (f"{stopped} interrupted, " if stopped else "")
          + f"{len(failed)} failed, {len(unreadable)} unreadable. "
          "Accuracies are final test accuracies in percent, mean ± "
          "sample std (number of seeds) over seeds. Produced by `slt report`.\n"]
    if runs:
        first = {**raw_settings(runs[0].config), **{k: v for k, v in runs[0].settings.items()
                                                     if k.startswith("search.")}}
        common = {k: v for k, v in first.items() if k not in study.varying}
        md.append("Settings shared by every run: " + ", ".join(
            f"`{k}={v}`" for k, v in sorted(common.items())) + ".\n")
    write_csv(out_dir / "results.csv", runs, unreadable)
    plots = _plotter(out_dir, note)

    if fin:
        header, rows, acc_series = accuracy_table(study)
        md += ["## Accuracy vs source density\n", markdown_table(header, rows)]
        md.append(plots.accuracy(acc_series))

        evaluator = Evaluator(evaluate_survival, note)
        srows = survival_rows(study, evaluator)
        if srows:
            header, rows, surv_series = survival_table(study, srows)
            md += ["## Survival as the source thins\n",
                   "Each sparser run is set against the dense-source run (d = 1) with the same "
                   "settings and seed. *Accuracy retained*: its accuracy over the dense run's. "
                   "*Dense-ticket edges in source*: the fraction of the dense ticket's edges "
                   "present in the sparser source (sources are nested and weights shared, so "
                   "these edges carry the same weights). *Surviving part, no search*: the dense "
                   "ticket restricted to those edges, evaluated as it is. *Searched again*: the "
                   "ticket searched inside the sparser source.\n",
                   markdown_table(header, rows)]
            md.append(plots.survival(surv_series))
        overlaps = overlap_tables(study)
        if overlaps:
            md.append("## Ticket overlap across densities\n\nJaccard |A ∩ B| / |A ∪ B| of the "
                      "tickets found from the same seed at two source densities.\n")
            for label, header, rows in overlaps:
                md += [f"**{label}**\n", markdown_table(header, rows)]
        widths = width_table(study)
        if widths:
            header, rows, w_series = widths
            md += ["## Width study\n", "w(d) = max(1, 1 / ln(1 / (1 − d))), the factor by which "
                   "the theory widens a source of density d (`model.width = \"theory\"` in a "
                   "sweep); * marks the width equal to it.\n", markdown_table(header, rows)]
            md.append(plots.width(w_series))
        profiles = layer_profiles(study)
        if profiles:
            md += ["## Layerwise source densities\n", _profile_table(profiles)]
            md.append(plots.profiles(profiles))
        for problem in study.ticket_errors.values():
            note(f"left out of the survival and overlap tables: {problem}")
    if running:
        state = {"running": "running", "interrupted": "interrupted (its process is gone): "
                 "rerun its search to resume"}
        md += ["## Running\n", markdown_table(["run", "epochs done", "last test acc", "state"], [
            [r.path.name, f"{r.epochs_done}/{r.config.search.epochs}",
             fmt_pct([r.acc] if r.acc is not None else []), state[r.status]]
            for r in running])]
    if failed:
        md += ["## Failed\n", markdown_table(["run", "error"],
                                             [[r.path.name, r.error] for r in failed])]
    if unreadable:
        md += ["## Unreadable run directories\n", "Left out of every table above.\n",
               markdown_table(["run", "what is wrong"],
                              [[u.path.name, u.reason] for u in unreadable])]
    if notes:
        md += ["## Notes\n", *[f"- {n}\n" for n in notes]]
    md.append("Per-run figures: `results.csv`.\n")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path


def _profile_table(profiles: dict[tuple, dict[float, list[tuple[str, float]]]]) -> str:
    parts = []
    for key, by_d in sorted(profiles.items(), key=str):
        densities = sorted(by_d, reverse=True)
        names = list(dict.fromkeys(n for d in densities for n, _ in by_d[d]))
        rows = [[name, *[f"{dict(by_d[d])[name]:.3f}" if name in dict(by_d[d]) else "–"
                         for d in densities]] for name in names]
        parts += [f"**{label_of(key)}**\n",
                  markdown_table(["layer", *[f"d={d:g}" for d in densities]], rows)]
    return "\n".join(parts)


class _NoPlots:
    def accuracy(self, series: Any) -> str:
        return ""

    survival = width = profiles = accuracy


def _plotter(out_dir: Path, note: Callable[[str], None]) -> Any:
    try:
        from slt.plots import Plots
    except ImportError:
        note("matplotlib is not installed (pip install 'slt[plot]'): tables only, no plots")
        return _NoPlots()
    return Plots(out_dir)
