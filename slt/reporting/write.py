"""The report's files: report.md with its tables and plots, and results.csv."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from slt.analysis import fmt_pct
from slt.errors import StorageError
from slt.fileio import atomic_write_text, output_dir, output_file
from slt.reporting.ground import effective_table, plant_table
from slt.reporting.runs import Run, Unreadable, load_runs, raw_settings
from slt.reporting.studies import Study, varying_keys
from slt.reporting.tables import (
    Evaluator,
    accuracy_table,
    layer_profiles,
    markdown_table,
    overlap_tables,
    profile_table,
    survival_rows,
    survival_table,
    width_table,
)

CSV_FIELDS = ["run_id", "status", "epochs_done", "final_test_acc", "best_test_acc", "time_s",
              "source_density_actual", "ticket_density_actual", "keep_actual",
              "effective_density", "source_effective_density", "plant_survival",
              "plant_recall", "plant_chance_recall", "plant_precision",
              "plant_accuracy_in_source", "error"]


def write_csv(path: Path, runs: list[Run], unreadable: list[Unreadable] = ()) -> None:
    """One row per run directory; an unreadable one has its reason in `error`."""
    raw = [raw_settings(r.config) for r in runs]
    keys = sorted({k for x in raw for k in x})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*CSV_FIELDS, "search.keep", "search.ticket_density", *keys])
    for r, values in zip(runs, raw):
        s = r.summary or {}
        source = s.get("effective", {}).get("source", {})
        plant = s.get("plant", {})
        w.writerow([r.path.name, r.status, r.epochs_done, r.acc, s.get("best_test_acc"),
                    s.get("time_s"), s.get("source_density"), s.get("ticket_density"),
                    s.get("keep"), s.get("effective_density"),
                    source.get("effective_density"), plant.get("survival"),
                    plant.get("recall"), plant.get("chance_recall"), plant.get("precision"),
                    plant.get("accuracy_in_source"), r.error, r.config.search.keep,
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
                 evaluate_survival: bool = True, log: Callable[[str], None] = print,
                 trust_model: bool | Collection[str] = False) -> Path:
    """Write report.md, results.csv and plots; returns the report.md path. The folder and
    every file in it are checked before anything is written (`report_folder`).
    `trust_model`: rebuild python: model references to evaluate surviving tickets (all of
    them, or those whose model.name is in the collection: a sweep's own)."""
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
    md = header_section(Path(runs_dir).name, study, unreadable)
    write_csv(out_dir / "results.csv", runs, unreadable)
    plots = _plotter(out_dir, note)
    if study.finished:
        md += study_sections(study, plots, Evaluator(evaluate_survival, note, trust_model), note)
    md += unfinished_sections(runs, unreadable)
    if notes:
        md += ["## Notes\n", *[f"- {n}\n" for n in notes]]
    md.append("Per-run figures: `results.csv`.\n")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path


def header_section(name: str, study: Study, unreadable: list[Unreadable]) -> list[str]:
    """The report's title, its count of run directories by state, and the shared settings."""
    runs = study.runs
    running = sum(r.status in ("running", "interrupted") for r in runs)
    stopped = sum(r.status == "interrupted" for r in runs)
    failed = sum(r.status == "failed" for r in runs)
    md = [f"# slt report: {name}\n",
          f"{len(runs) + len(unreadable)} run directories: {len(study.finished)} finished, "
          f"{running - stopped} running, "
          + (f"{stopped} interrupted, " if stopped else "")
          + f"{failed} failed, {len(unreadable)} unreadable. "
          "Accuracies are final test accuracies in percent, mean ± "
          "sample std (number of seeds) over seeds. Produced by `slt report`.\n"]
    if runs:
        first = {**raw_settings(runs[0].config), **{k: v for k, v in runs[0].settings.items()
                                                     if k.startswith("search.")}}
        common = {k: v for k, v in first.items() if k not in study.varying}
        md.append("Settings shared by every run: " + ", ".join(
            f"`{k}={v}`" for k, v in sorted(common.items())) + ".\n")
    return md


def study_sections(study: Study, plots: Any, evaluator: Evaluator,
                   note: Callable[[str], None]) -> list[str]:
    """The finished runs' sections: accuracy, survival, overlap, width and layer profiles,
    each table with its plot; notes the runs whose tickets could not be read."""
    header, rows, acc_series = accuracy_table(study)
    md = ["## Accuracy vs source density\n", markdown_table(header, rows)]
    md.append(plots.accuracy(acc_series))
    md += survival_section(study, plots, evaluator)
    md += ground_sections(study, plots, evaluator)
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
        md += ["## Layerwise source densities\n", profile_table(profiles)]
        md.append(plots.profiles(profiles))
    for problem in study.ticket_errors.values():
        note(f"left out of the survival and overlap tables: {problem}")
    return md


def survival_section(study: Study, plots: Any, evaluator: Evaluator) -> list[str]:
    """Sparse runs set against their dense counterparts, with its plot ([] when none pairs)."""
    srows = survival_rows(study, evaluator)
    if not srows:
        return []
    header, rows, surv_series = survival_table(study, srows)
    return ["## Survival as the source thins\n",
            "Each sparser run is set against the dense-source run (d = 1) with the same "
            "settings and seed. *Accuracy retained*: its accuracy over the dense run's. "
            "*Dense-ticket edges in source*: the fraction of the dense ticket's edges "
            "present in the sparser source (sources are nested and weights shared, so "
            "these edges carry the same weights). *Surviving part, no search*: the dense "
            "ticket restricted to those edges, evaluated as it is. *Searched again*: the "
            "ticket searched inside the sparser source.\n",
            markdown_table(header, rows), plots.survival(surv_series)]


def ground_sections(study: Study, plots: Any, evaluator: Evaluator) -> list[str]:
    """The planted ticket's section (runs with a plant) and effective vs nominal density
    (runs that recorded it), each with its plot; [] when neither applies."""
    md: list[str] = []
    planted = plant_table(study)
    if planted:
        header, rows, series = planted
        md += ["## Planted ticket\n",
               "The teacher that labels the data is planted in the student's weights, so "
               "a perfect ticket exists (`[plant]`). *Planted edges in source*: the share "
               "of them the random source holds. *Recall*: the share of them the found "
               "ticket holds (of all, and of those in the source); *chance recall*: what a "
               "ticket of the same size per layer drawn at random from the source would "
               "hold. *Precision*: the planted share of the ticket. *Plant in source, no "
               "search*: the plant restricted to the source, evaluated as it is; beside "
               "it the found "
               "ticket's accuracy: a ticket as good as the plant with a low recall is "
               "another ticket, not the plant.\n", markdown_table(header, rows),
               plots.planted(series)]
    effective = effective_table(study, evaluator)
    if effective:
        header, rows, series, differs = effective
        md += ["## Effective vs nominal ticket density\n",
               "Percent of the prunable weights: edges on at least one input-to-output "
               "path / edges the ticket holds (mean over seeds). An edge whose unit is cut "
               "off from the input or the output counts in the nominal density only.\n",
               markdown_table(header, rows)]
        if differs:
            md.append(plots.effective(series))
    return md


def unfinished_sections(runs: list[Run], unreadable: list[Unreadable]) -> list[str]:
    """The runs still running or interrupted, the failed ones and the unreadable directories,
    each a table (none when there are none)."""
    running = [r for r in runs if r.status in ("running", "interrupted")]
    failed = [r for r in runs if r.status == "failed"]
    md: list[str] = []
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
    return md


class _NoPlots:
    def accuracy(self, series: Any) -> str:
        return ""

    survival = width = profiles = planted = effective = accuracy


def _plotter(out_dir: Path, note: Callable[[str], None]) -> Any:
    try:
        from slt.reporting.plots import Plots
    except ImportError:
        note("matplotlib is not installed (pip install 'slt[plot]'): tables only, no plots")
        return _NoPlots()
    return Plots(out_dir)
