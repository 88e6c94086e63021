"""Command line: `slt SUBCOMMAND ...` (and `python run.py ...`, the same thing).

Every user mistake (config, data, ticket) ends as one `slt: error: ...` line on stderr
and exit code 2, before any file is written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence

from slt import __version__
from slt.cli_bench import bench_parser
from slt.cli_doctor import doctor_parser
from slt.cli_layers import layers_parser
from slt.cli_sweep import status_parser, sweep_parser
from slt.errors import SltError, storage_error

DEMO_SWEEP = "demo_sweep.toml"  # packaged: configs/demo_sweep.toml
DEMO_OUT = "runs/demo"


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="TOML config (a path, or the name of a "
                   "packaged config such as mnist_lenet.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set source.density=0.2 (repeatable)")


def cmd_search(args: argparse.Namespace) -> int:
    from slt.api import search

    search(args.config, overrides=args.overrides, out=args.out,
           embed_weights=args.embed_weights, progress=False if args.no_progress else None)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from slt.api import evaluate, load_ticket
    from slt.engine.measure import effective_lines

    ticket = load_ticket(args.ticket)
    result = evaluate(ticket, overrides=args.overrides, device=args.device,
                      trust_model=args.trust_model)
    acc, loss, recorded = result.test_acc, result.test_loss, result.recorded_test_acc
    dens = ticket.header["densities"]
    print(f"ticket {args.ticket}")
    print(f"  source density {dens['source_density']:.4f} ({dens['n_source']} of "
          f"{dens['n_prunable']} prunable weights)")
    print(f"  ticket density {dens['ticket_density']:.4f} absolute, {dens['keep']:.4f} of the "
          f"source ({dens['n_ticket']} weights)")
    line = f"  test accuracy {acc:.4f}  loss {loss:.4f}"
    if recorded is not None:
        same = "same" if result.same_as_recorded else "DIFFERENT"
        line += f"  (run recorded {recorded:.4f}: {same})"
    print(line)
    if result.effective is not None:
        print("\n".join(effective_lines(result.effective)))
    if args.json:
        print(json.dumps({"test_acc": acc, "test_loss": loss, "recorded_test_acc": recorded,
                          "effective": result.effective}))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from slt.config.checks import is_reference
    from slt.config.ids import run_id
    from slt.config.toml import load_raw, to_toml
    from slt.models import library_versions
    from slt.resolve import load, rule_settings

    cfg = load(args.config, args.overrides)
    # values the scoring rule declared (the user's file and --set left them unset)
    from_rule = rule_settings(load_raw(args.config, args.overrides))
    notes = {f"search.{key}": f"from scorer {cfg.search.scorer} (slt scorers)"
             for key in from_rule}
    print(f"# run id: {run_id(cfg)}")
    print(f"# ticket density {cfg.ticket_density:.6g} absolute, keep {cfg.keep:.6g} of the source")
    if is_reference(cfg.model.name):
        versions = ", ".join(f"{k} {v}" for k, v in library_versions(cfg.model.name).items())
        print(f"# model: reference {cfg.model.name}" + (f" ({versions})" if versions else "")
              + "; slt layers lists what is searched")
    print(to_toml(cfg, notes), end="")
    return 0


def cmd_config_id(args: argparse.Namespace) -> int:
    from slt.config.ids import hashed_values, legacy_run_id, run_id
    from slt.resolve import load

    cfg = load(args.config, args.overrides)
    print(run_id(cfg))
    if args.verbose:
        for key, value in sorted(hashed_values(cfg).items()):
            print(f"  {key} = {value!r}")
        print(f"  (before only changed values were hashed: {legacy_run_id(cfg)})")
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    from slt.config.toml import describe

    for key, default, text in describe():
        print(f"{key:28s} {default:22s} {text}")
    return 0


def cmd_scorers(args: argparse.Namespace) -> int:
    import dataclasses

    from slt.scorers import SCORERS
    from slt.scorers.lookup import rule_optimizer, scorer_class

    def shown(value: object) -> str:
        return format(value, "g") if isinstance(value, float) else str(value)

    for name in SCORERS.names():
        try:
            cls = scorer_class(name)
        except SltError as exc:  # a plug-in that is not a Scorer: listed, not fatal
            print(f"{name:18s} unusable: {exc}")
            continue
        paragraph = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        summary = cls.summary or paragraph.split(". ")[0].rstrip(".")
        options = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Options))
        optimizer = ", ".join(f"{k}={shown(v)}" for k, v in rule_optimizer(cls).items())
        origin = SCORERS.origins.get(name, "slt")
        print(f"{name:18s} {summary}" + (f" [options: {options}]" if options else "")
              + (f" [optimizer: {optimizer}]" if optimizer else "")
              + (f" (from {origin})" if origin != "slt" else ""))
    for name, why in sorted(SCORERS.broken.items()):
        print(f"{name:18s} failed to load: {why}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from slt.api import report

    path = report(args.runs, out=args.out, evaluate_survival=not args.no_eval,
                  trust_model=args.trust_model)
    print(f"report: {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from slt import ticket as ticket_io
    from slt.export import EXPORTS, export
    from slt.fileio import output_file

    EXPORTS.get(args.format)  # a mistyped format, or an --out that cannot be written,
    output_file(args.out, [args.ticket])  # fails before the ticket is read
    ticket = ticket_io.load(args.ticket)
    size = export(ticket, args.out, args.format, sparse=args.sparse,  # never over ticket.path
                  trust_model=args.trust_model)
    layout = ", sparse CSR" if args.sparse else ""
    print(f"wrote {args.out} ({args.format}{layout}): {size} bytes")
    return 0


def _run_parsers(sub: argparse._SubParsersAction) -> None:
    """`slt search` and `slt sweep` (slt.cli_sweep): the commands that run searches (one,
    or a grid)."""
    p = sub.add_parser("search", help="search a ticket for one config")
    _add_config_args(p)
    p.add_argument("--out", default="runs", help="folder of run directories (default: runs)")
    p.add_argument("--embed-weights", action="store_true",
                   help="store the weights in ticket.slt (portable across torch versions); "
                   "on a finished run, rewrites its ticket that way")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_search)
    sweep_parser(sub)


def _result_parsers(sub: argparse._SubParsersAction) -> None:
    """`slt report`, `scorers`, `eval`, `export`: what runs found, rules, saved tickets."""
    p = sub.add_parser("report", help="tables and plots from a folder of run directories")
    p.add_argument("runs", help="folder holding run directories (e.g. a sweep's --out)")
    p.add_argument("--out", help="where to write report.md, results.csv and plots "
                   "(default: RUNS/report)")
    p.add_argument("--no-eval", action="store_true",
                   help="skip evaluating surviving tickets (needs the data and a forward pass)")
    p.add_argument("--trust-model", action="store_true", help="rebuild a python: model "
                   "reference a run names (imports and runs that code)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("scorers", help="list the installed scoring rules, one line each")
    p.set_defaults(func=cmd_scorers)

    p = sub.add_parser("eval", help="rebuild a saved ticket and report its test accuracy")
    p.add_argument("ticket", help="a ticket.slt file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the ticket's config, e.g. --set data.root=PATH "
                   "(default data.root: $SLT_DATA when set, else the run's)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="device (default: the run's)")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.add_argument("--trust-model", action="store_true", help="rebuild a python: model "
                   "reference the ticket names (imports and runs that code)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a ticket as a plain PyTorch file: state_dict, "
                       "prune (torch.nn.utils.prune form) or onnx (docs/export.md)")
    p.add_argument("ticket", help="a ticket.slt file")
    p.add_argument("--format", default="state_dict", metavar="FORMAT",
                   help="state_dict (default), prune or onnx (needs the onnx extra)")
    p.add_argument("--out", required=True, help="the file to write: a new file, or a regular "
                   "file other than the ticket, replaced atomically (a symlink: its target)")
    p.add_argument("--sparse", action="store_true",
                   help="store mostly-pruned weights as CSR tensors (state_dict and prune)")
    p.add_argument("--trust-model", action="store_true", help="rebuild a python: model "
                   "reference the ticket names (imports and runs that code)")
    p.set_defaults(func=cmd_export)


def _config_parser(sub: argparse._SubParsersAction) -> None:
    """`slt config show|id|keys`: a config inspected without running it."""
    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = csub.add_parser("show", help="print the fully resolved config")
    _add_config_args(c, required=False)
    c.set_defaults(func=cmd_config_show)
    c = csub.add_parser("id", help="print the run directory name of a config (its run id)")
    _add_config_args(c, required=False)
    c.add_argument("-v", "--verbose", action="store_true",
                   help="also the values that make it: every key set away from its default")
    c.set_defaults(func=cmd_config_id)
    c = csub.add_parser("keys", help="list every config key with its default and help")
    c.set_defaults(func=cmd_config_keys)


def build_parser() -> argparse.ArgumentParser:
    """The `slt` parser: one sub-parser per command, each built by its own function."""
    parser = argparse.ArgumentParser(
        prog="slt", description="Strong-lottery-ticket search inside random sparse sources.")
    parser.add_argument("--version", action="version", version=f"slt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_run_parsers, _result_parsers, _config_parser, bench_parser, layers_parser,
                doctor_parser):
        add(sub)
    return parser


def default_argv() -> list[str]:
    """The offline default: the demo density sweep on the planted-teacher task, then its
    report (no files, no network)."""
    return ["sweep", DEMO_SWEEP, "--out", DEMO_OUT, "--workers", str(min(2, os.cpu_count() or 1))]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = default_argv()
    if argv[:2] == ["sweep", "status"]:  # `slt sweep status OUT`, beside `slt sweep FILE`
        args = status_parser().parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    resume = "; rerun the same command to resume" if args.command in ("search", "sweep") else ""
    previous = signal.signal(signal.SIGTERM, _terminate)  # SLURM's way to stop a job
    try:
        return args.func(args)
    except Terminated:
        print(f"slt: terminated{resume}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except SltError as exc:
        print(f"slt: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `slt ... | head`: the reader left; nothing to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # a filesystem failure no module turned into a StorageError
        print(f"slt: error: {storage_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slt: interrupted{resume}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: runs stop where a rerun resumes them, a sweep stops its
    workers and writes its record."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
