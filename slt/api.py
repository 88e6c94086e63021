"""slt as a library: the functions `import slt` offers, and that the CLI calls.

Each takes what a notebook has at hand (a path, a packaged config name, a Config, a dict
of TOML tables; `--set` strings or a mapping of dotted keys) and returns plain objects.
Mistakes raise the same `slt.errors.SltError` classes whose message the CLI prints as its
one error line.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slt.config import Config, apply_overrides
from slt.errors import ConfigError

if TYPE_CHECKING:
    from slt.engine import SearchResult
    from slt.sweeps import SweepOutcome
    from slt.ticket import Ticket

PathLike = str | os.PathLike  # a path: str or pathlib.Path
ConfigLike = PathLike | Config | Mapping[str, Any] | None
Overrides = Sequence[str] | Mapping[str, Any] | None


def _override_list(overrides: Overrides) -> list[str]:
    """`--set` strings from a list of them or from {"source.density": 0.2, ...}."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        from slt.config import toml_value

        return [f"{k}={toml_value(str(v) if isinstance(v, os.PathLike) else v)}"
                for k, v in overrides.items()]
    if isinstance(overrides, str):
        raise ConfigError("overrides must be a list of 'key=value' strings or a mapping, "
                          f"got the string {overrides!r}")
    return list(overrides)


def load_config(config: ConfigLike = None, overrides: Overrides = None) -> Config:
    """The Config a search would run: from a TOML path or packaged name (e.g.
    "mnist_lenet.toml"), a Config, a dict of TOML tables, or None (the defaults); then
    `overrides` (["source.density=0.2"] or {"source.density": 0.2}); checked, the scoring
    rule's settings filled in, every name looked up."""
    from slt import resolve

    extra = _override_list(overrides)
    if isinstance(config, Config):
        return resolve.resolve(apply_overrides(config.to_dict(), extra), "config")
    if isinstance(config, Mapping):
        raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
        return resolve.resolve(apply_overrides(raw, extra), "config")
    return resolve.load(config, extra)


def search(config: ConfigLike = None, *, overrides: Overrides = None,
           out: PathLike = "runs", embed_weights: bool = False, progress: bool | None = False,
           log: Callable[[str], None] | None = print) -> SearchResult:
    """Search (or resume, or find finished) the ticket of `config` under `out`, exactly as
    `slt search` does; returns the run's directory, status, summary and `.ticket`. Under
    torchrun, every process calls it and they search together. `progress`: a progress bar
    (None: as `run.progress` says); `log`: where the per-epoch lines go (None: nowhere)."""
    from slt.engine import run_search
    from slt.platform import Platform

    cfg = load_config(config, overrides)
    if progress is not None and progress != cfg.run.progress:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress=progress))
    platform = Platform.from_env(cfg.run.device)  # alone, or one rank under torchrun
    try:
        return run_search(cfg, out, embed_weights=embed_weights, platform=platform,
                          log=log or (lambda _: None))
    finally:
        platform.close()


def load_ticket(path: PathLike) -> Ticket:
    """A ticket file (checked): its config, masks, densities; `.to_module()` for PyTorch."""
    from slt import ticket

    return ticket.load(path)


@dataclass(frozen=True)
class Evaluation:
    test_acc: float
    test_loss: float
    recorded_test_acc: float | None  # what the run recorded, when the ticket says

    @property
    def same_as_recorded(self) -> bool | None:
        if self.recorded_test_acc is None:
            return None
        return abs(self.recorded_test_acc - self.test_acc) < 1e-12


def evaluate(ticket: Ticket | PathLike, data: PathLike | None = None, *,
             overrides: Overrides = None, device: str | None = None) -> Evaluation:
    """Rebuild a ticket (or a ticket file) and measure it on its dataset's test split;
    `data` is the data root on this machine (default: $SLT_DATA when set, else the run's)."""
    from slt import ticket as ticket_io
    from slt.capacity import allocation_errors
    from slt.data import open_batches
    from slt.engine import evaluate as evaluate_net
    from slt.platform import resolve_device
    from slt.resolve import resolve

    t = ticket if not isinstance(ticket, (str, os.PathLike)) else ticket_io.load(ticket)
    extra = _override_list(overrides)
    root = str(data) if data is not None else os.environ.get("SLT_DATA")
    if root and not any(o.startswith("data.root=") for o in extra):
        extra.insert(0, f"data.root={root}")
    origin = str(ticket) if isinstance(ticket, (str, os.PathLike)) else "the ticket's config"
    cfg = resolve(apply_overrides(t.config.to_dict(), extra), origin)
    t = dataclasses.replace(t, config=cfg)
    dev = resolve_device(device or cfg.run.device)
    batches = open_batches(cfg.data, dev)
    with allocation_errors(cfg, batches.spec):  # a ticket found on a bigger machine
        net = ticket_io.rebuild(t, dev)
        loss, acc = evaluate_net(net, batches, cfg.search.eval_batch_size)
    return Evaluation(acc, loss, t.metrics.get("test_acc"))


def sweep_settings(sweep_file: PathLike, overrides: Overrides = None
                   ) -> tuple[Any, dict[str, Any]]:
    """The sweep file read and its `--set` overrides checked (keys, no two spellings)."""
    from slt.config import check_alternatives, check_key, parse_override
    from slt.sweeps import load_sweep

    s = load_sweep(sweep_file)
    given = dict(parse_override(item) for item in _override_list(overrides))
    for key in given:
        check_key(key, "--set")
    check_alternatives(given, "--set")
    return s, given


def sweep(sweep_file: PathLike, *, out: PathLike = "runs", workers: int = 1,
          overrides: Overrides = None, progress: bool = False, report: bool = True,
          log: Callable[[str], None] = print,
          summary: Callable[[SweepOutcome], None] | None = None) -> SweepOutcome:
    """Run a sweep file's grid here (as `slt sweep`, in `workers` processes), then write its
    report; returns what happened to each point (`done`, `failed`, `skipped`, ...).
    `summary` is called with the outcome before the report is written."""
    from slt.errors import SltError
    from slt.sweeps import run_sweep

    if workers < 1:
        raise SltError(f"--workers must be at least 1, got {workers}")
    s, given = sweep_settings(sweep_file, overrides)
    outcome = run_sweep(s, out, workers, given, progress=progress, log=log)
    if summary is not None:
        summary(outcome)
    if report:
        from slt.reporting import write_report

        log(f"report: {write_report(out, log=log)}")
    return outcome


def report(runs: PathLike, *, out: PathLike | None = None, evaluate_survival: bool = True,
           log: Callable[[str], None] = print) -> Path:
    """Tables and plots (report.md, results.csv, PNGs) from a folder of run directories;
    returns report.md's path."""
    from slt.reporting import write_report

    return write_report(runs, out, evaluate_survival=evaluate_survival, log=log)
