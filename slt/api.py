"""slt as a library: the functions `import slt` offers, and that the CLI calls.

Each takes what a notebook has at hand (a path, a packaged config name, a Config, a dict
of TOML tables; `--set` strings or a mapping of dotted keys) and returns plain objects.
Mistakes raise the same `slt.errors.SltError` classes whose message the CLI prints as its
one error line; arguments of a wrong type or value too (slt.arguments), before any work.
numpy and torch scalars are numbers here; a key given the value None is a key not given.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slt.arguments import (
    bool_arg,
    callable_arg,
    device_arg,
    int_arg,
    path_arg,
    shown,
    ticket_arg,
)
from slt.config.schema import Config
from slt.config.toml import apply_overrides
from slt.errors import ConfigError, DataError
from slt.fileio import output_dir

if TYPE_CHECKING:
    from slt.engine.run import SearchResult
    from slt.sweeps.grid import SweepOutcome
    from slt.ticket import Ticket

PathLike = str | os.PathLike  # a path: str or pathlib.Path
ConfigLike = PathLike | Config | Mapping[str, Any] | None
Overrides = Sequence[str] | Mapping[str, Any] | None


def _override_list(overrides: Overrides) -> list[str]:
    """`--set` strings from a list of them or from {"source.density": 0.2, ...}. In a
    mapping, numpy / torch scalars are their numbers and a None value is a key not given
    (the base config's value stays, else slt's default)."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{_override_key(k)}={_override_value(k, v)}"
                for k, v in overrides.items() if v is not None]
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, Iterable):
        raise ConfigError("overrides must be a list of 'key=value' strings or a mapping, "
                          f"got {shown(overrides)}")
    items = list(overrides)  # a tuple or a generator as well as a list
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"overrides must be 'key=value' strings, got {shown(item)} in "
                              "the list")
    return items


def _override_key(key: Any) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"overrides: a key must be a 'section.key' string, got {shown(key)}")
    return key


def _override_value(key: str, value: Any) -> str:
    """One override's value in TOML syntax (a path as its string)."""
    from slt.config.toml import toml_value

    try:
        return toml_value(os.fspath(value) if isinstance(value, os.PathLike) else value)
    except TypeError:
        raise ConfigError(f"overrides[{key!r}]: {shown(value)} is not a config value (a "
                          "number, true/false, a string, or a list of them)") from None


def _tables(config: Mapping[Any, Any]) -> dict[str, Any]:
    """A dict config's TOML tables, plain dicts; None (a table or a value) is not given."""
    raw: dict[str, Any] = {}
    for name, body in config.items():
        if not isinstance(name, str):
            raise ConfigError(f"config: a section name must be a string, got {shown(name)}")
        if body is None:
            continue
        if isinstance(body, Mapping):
            body = {k: v for k, v in body.items() if v is not None}
        raw[name] = body
    return raw


def load_config(config: ConfigLike = None, overrides: Overrides = None) -> Config:
    """The Config a search would run: from a TOML path or packaged name (e.g.
    "mnist_lenet.toml"), a Config, a dict of TOML tables, or None (the defaults); then
    `overrides` (["source.density=0.2"] or {"source.density": 0.2}); checked, the scoring
    rule's settings filled in, every name looked up. A None value is a key not given."""
    from slt import resolve

    extra = _override_list(overrides)
    if isinstance(config, Config):
        return resolve.resolve(apply_overrides(config.to_dict(), extra), "config")
    if isinstance(config, Mapping):
        return resolve.resolve(apply_overrides(_tables(config), extra), "config")
    if config is not None and not isinstance(config, (str, os.PathLike)):
        hint = " (a ticket's config is ticket.config)" if type(config).__name__ == "Ticket" \
            else ""
        raise ConfigError("config must be a TOML path, a packaged config name, a Config or a "
                          f"dict of TOML tables, got {shown(config)}{hint}")
    return resolve.load(None if config is None else path_arg(config, "config"), extra)


def search(config: ConfigLike = None, *, overrides: Overrides = None,
           out: PathLike = "runs", embed_weights: bool = False, progress: bool | None = False,
           log: Callable[[str], None] | None = print,
           model: str | Callable[..., Any] | None = None) -> SearchResult:
    """Search (or resume, or find finished) the ticket of `config` under `out`, exactly as
    `slt search` does; returns the run's directory, status, summary and `.ticket`. Under
    torchrun, every process calls it and they search together. `progress`: a progress bar
    (None: as `run.progress` says); `log`: where the per-epoch lines go (None: nowhere).
    `model`: a model name or reference, or an importable factory function returning an
    nn.Module (recorded as python:module:function; its arguments go in model.kwargs)."""
    from slt.engine.platform import Platform
    from slt.engine.run import run_search
    from slt.models import reference_of

    out = output_dir(path_arg(out, "out"), create=False, name="runs folder")
    embed_weights = bool(bool_arg(embed_weights, "embed_weights"))
    progress = bool_arg(progress, "progress", optional=True)
    callable_arg(log, "log")
    extra = _override_list(overrides)
    if model is not None:
        extra.append(f"model.name={_override_value('model', reference_of(model))}")
    cfg = load_config(config, extra)
    if progress is not None and progress != cfg.run.progress:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress=progress))
    platform = Platform.from_env(cfg.run.device)  # alone, or one rank under torchrun
    try:
        return run_search(cfg, out, embed_weights=embed_weights, platform=platform,
                          log=log or _nowhere)
    finally:
        platform.close()


def load_ticket(path: PathLike) -> Ticket:
    """A ticket file (checked): its config, masks, densities; `.to_module()` for PyTorch."""
    from slt import ticket

    return ticket.load(path_arg(path, "path"))


@dataclass(frozen=True)
class Evaluation:
    test_acc: float
    test_loss: float
    recorded_test_acc: float | None  # what the run recorded, when the ticket says
    # effective density of the ticket and of its source (slt.engine.measure.effective_records)
    effective: dict[str, Any] | None = None

    @property
    def same_as_recorded(self) -> bool | None:
        if self.recorded_test_acc is None:
            return None
        return abs(self.recorded_test_acc - self.test_acc) < 1e-12


def evaluate(ticket: Ticket | PathLike, data: PathLike | None = None, *,
             overrides: Overrides = None, device: str | None = None,
             trust_model: bool = False) -> Evaluation:
    """Rebuild a ticket (or a ticket file) and measure it on its dataset's test split;
    `data` is the data root on this machine (default: $SLT_DATA when set, else the run's).
    Data whose examples or classes differ from the ticket's (an override of data.name,
    say) is one DataError line naming both, before the network is built. A ticket of a
    `python:` model reference rebuilds only with `trust_model` (it imports that code)."""
    from slt import ticket as ticket_io
    from slt.capacity import allocation_errors
    from slt.data.loader import open_batches
    from slt.engine.measure import evaluate as evaluate_net
    from slt.engine.measure import measured_effective
    from slt.engine.platform import resolve_device
    from slt.models import model_known
    from slt.resolve import resolve

    if isinstance(ticket, (str, os.PathLike)):
        t = ticket_io.load(path_arg(ticket, "ticket"))
    else:
        t = ticket_arg(ticket, "ticket", paths_too=True)
    data = None if data is None else path_arg(data, "data")
    device = device_arg(device)
    if bool_arg(trust_model, "trust_model"):
        t = dataclasses.replace(t, trust_model=True)
    model_known(t.config.model.name, trusted=t.trust_model)  # before anything imports it
    given = _override_list(overrides)
    extra = list(given)
    root = str(data) if data is not None else os.environ.get("SLT_DATA")
    if root and not any(o.startswith("data.root=") for o in extra):
        extra.insert(0, f"data.root={root}")
    origin = str(ticket) if isinstance(ticket, (str, os.PathLike)) else "the ticket's config"
    cfg = resolve(apply_overrides(t.config.to_dict(), extra), origin)
    t = dataclasses.replace(t, config=cfg)
    dev = resolve_device(device or cfg.run.device)
    # only the test split is measured, and train_limit changes neither it nor the
    # normalisation (whole training set): a ticket whose run asked more than its split
    # held (accepted before limits were checked) still evaluates
    batches = open_batches(dataclasses.replace(cfg.data, train_limit=0), dev)
    check_data_fits(t, batches.spec, [o for o in given if o.startswith("data.")])
    with allocation_errors(cfg, batches.spec):  # a ticket found on a bigger machine
        net = ticket_io.rebuild(t, dev)
        loss, acc = evaluate_net(net, batches, cfg.search.eval_batch_size)
        effective = measured_effective(net, t.compact_masks(), batches.spec.shape)
    return Evaluation(acc, loss, t.metrics.get("test_acc"), effective)


def check_data_fits(ticket: Ticket, spec: Any, changed: Sequence[str] = ()) -> None:
    """DataError unless data of `spec` (example shape, class count) is what the ticket's
    model was built for: the ticket's header records the spec of the data it was found on,
    and other data would reach its first layer as a shape error deep in torch."""
    want = ticket.header["spec"]
    want_shape, want_classes = tuple(want["shape"]), want["num_classes"]
    if tuple(spec.shape) == want_shape and spec.num_classes == want_classes:
        return
    dims = "x".join
    why = f" (overrides: {', '.join(changed)})" if changed else ""
    raise DataError(
        f"the data does not fit the ticket's model: dataset "
        f"{ticket.config.data.name} has examples of shape "
        f"{dims(map(str, spec.shape))} in {spec.num_classes} classes, the ticket's model "
        f"takes {dims(map(str, want_shape))} in {want_classes} classes{why}")


def sweep_settings(sweep_file: PathLike, overrides: Overrides = None
                   ) -> tuple[Any, dict[str, Any]]:
    """The sweep file read and its `--set` overrides checked (keys, no two spellings)."""
    from slt.config.checks import check_alternatives
    from slt.config.toml import check_key, parse_override
    from slt.sweeps.grid import load_sweep

    s = load_sweep(path_arg(sweep_file, "sweep_file"))
    given = dict(parse_override(item) for item in _override_list(overrides))
    for key in given:
        check_key(key, "--set")
    check_alternatives(given, "--set")
    return s, given


def sweep(sweep_file: PathLike, *, out: PathLike = "runs", workers: int = 1,
          overrides: Overrides = None, progress: bool = False, report: bool = True,
          log: Callable[[str], None] | None = print,
          summary: Callable[[SweepOutcome], None] | None = None) -> SweepOutcome:
    """Run a sweep file's grid here (as `slt sweep`, in `workers` processes), then write its
    report; returns what happened to each point (`done`, `failed`, `skipped`, ...).
    `summary` is called with the outcome before the report is written. With workers > 1,
    call it under `if __name__ == "__main__":` in a script: each worker imports the script
    again (docs/api.md)."""
    from slt.sweeps.local import run_sweep

    out = output_dir(path_arg(out, "out"), create=False, name="runs folder")
    workers = int_arg(workers, "workers", minimum=1)
    progress = bool(bool_arg(progress, "progress"))
    report = bool(bool_arg(report, "report"))
    log = callable_arg(log, "log") or _nowhere
    callable_arg(summary, "summary")
    s, given = sweep_settings(sweep_file, overrides)
    outcome = run_sweep(s, out, workers, given, progress=progress, log=log)
    if summary is not None:
        summary(outcome)
    if report:
        from slt.reporting.write import write_report

        # only the sweep's own models: its folder may hold others' runs
        own = frozenset(p.config.model.name for p in outcome.points if p.config)
        log(f"report: {write_report(out, log=log, trust_model=own)}")
    return outcome


def report(runs: PathLike, *, out: PathLike | None = None, evaluate_survival: bool = True,
           log: Callable[[str], None] | None = print, trust_model: bool = False) -> Path:
    """Tables and plots (report.md, results.csv, PNGs) from a folder of run directories;
    returns report.md's path. `trust_model`: runs of python: model references are rebuilt
    to evaluate surviving tickets (that imports the code their configs name)."""
    from slt.reporting.write import write_report

    runs = path_arg(runs, "runs")
    out = None if out is None else path_arg(out, "out")
    evaluate_survival = bool(bool_arg(evaluate_survival, "evaluate_survival"))
    log = callable_arg(log, "log") or _nowhere
    return write_report(runs, out, evaluate_survival=evaluate_survival, log=log,
                        trust_model=bool(bool_arg(trust_model, "trust_model")))


def _nowhere(_: str) -> None:
    """A log that keeps nothing (log=None)."""
