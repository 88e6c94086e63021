"""`slt sweep FILE` (run a grid, or with --dry-run list it with time estimates) and
`slt sweep status OUT`: their arguments and handlers, apart from cli.py."""

from __future__ import annotations

import argparse
import os
import sys

from slt.errors import SltError

DRY_RUN_STEPS = 2  # timed search steps per network in a dry run, after one warm-up


def cmd_sweep(args: argparse.Namespace) -> int:
    from slt.api import sweep, sweep_settings
    from slt.fileio import output_dir

    # a file (device, FIFO) there: one line before any point runs
    output_dir(args.out, create=False, name="runs folder")
    if args.dry_run:
        return cmd_sweep_dry_run(args)
    if args.bench or args.dry_run_steps is not None:
        raise SltError("--bench and --dry-run-steps go with --dry-run")
    if args.launcher != "local":  # jobs: queued, and with --wait followed, by the sweeps wing
        from slt.sweeps.follow import launch_and_follow

        s, given = sweep_settings(args.sweep, args.overrides)
        return launch_and_follow(s, args.out, args.launcher, given, args.launcher_overrides,
                                 wait=args.wait, poll=args.poll, progress=not args.no_progress,
                                 report=not args.no_report)
    if args.launcher_overrides or args.wait:
        raise SltError("--launcher-set and --wait go with --launcher slurm or submitit-local")
    outcome = sweep(args.sweep, out=args.out, workers=args.workers, overrides=args.overrides,
                    progress=not args.no_progress, report=not args.no_report,
                    summary=lambda o: print(o.line(args.out)))
    return 1 if outcome.failed else 0


def cmd_sweep_dry_run(args: argparse.Namespace) -> int:
    """`slt sweep FILE --dry-run`: the runs in the order they would start, their states in
    --out and estimated times; nothing runs and nothing is written."""
    from slt.api import sweep_settings
    from slt.sweeps.dryrun import dry_run, format_dry_run

    steps = DRY_RUN_STEPS if args.dry_run_steps is None else args.dry_run_steps
    if steps < 1:
        raise SltError(f"--dry-run-steps must be at least 1, got {steps}")
    if args.wait:
        raise SltError("--wait and --dry-run: a dry run queues nothing to wait for")
    s, given = sweep_settings(args.sweep, args.overrides)
    if args.launcher == "local":
        if args.launcher_overrides:
            raise SltError("--launcher-set goes with --launcher slurm or submitit-local")
        if args.workers < 1:
            raise SltError(f"--workers must be at least 1, got {args.workers}")
        # as the local pool gives them: the cores shared among the workers
        parallel, word = args.workers, "worker" if args.workers == 1 else "workers"
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    else:  # a job array: array_parallelism jobs at once, each with cpus_per_task threads
        from slt.sweeps.slurm import parse_resources

        res = parse_resources(s.launcher, list(args.launcher_overrides),
                              f"{s.path} [launcher]")
        parallel, word, threads = res.array_parallelism, "jobs at once", res.cpus_per_task
    result = dry_run(s, args.out, given, parallel, threads, bench=args.bench, steps=steps,
                     log=lambda line: print(line, file=sys.stderr))
    print(format_dry_run(result, word))
    return 0


def cmd_sweep_status(args: argparse.Namespace) -> int:
    from slt.sweeps.status import format_status, sweep_status

    states = sweep_status(args.out)
    print(format_status(states))
    return 1 if any(s.state in ("failed", "damaged") for s in states) else 0


def status_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slt sweep status", description="Where every point of a sweep stands: one line "
        "per point (finished with its accuracy, running with its epoch, queued, interrupted, "
        "failed with the reason, a damaged record named) and a summary line. Exit 1 when a "
        "point failed or a record is damaged.")
    p.add_argument("out", help="the sweep's --out folder")
    p.set_defaults(func=cmd_sweep_status, command="sweep-status")
    return p


def sweep_parser(sub: argparse._SubParsersAction) -> None:
    """`slt sweep FILE`: a grid of searches, run here or as jobs, or listed (--dry-run)."""
    p = sub.add_parser("sweep", help="run a grid of searches from a sweep file, then report "
                       "(slt sweep status OUT: where each point stands; --dry-run: what "
                       "would run, and how long it would take)")
    p.add_argument("sweep", help="sweep TOML (base config, [set], [axes]); a path or the name "
                   "of a packaged sweep such as demo_sweep.toml")
    p.add_argument("--out", default="runs", help="folder of run directories (default: runs)")
    p.add_argument("--workers", type=int, default=1, help="points run in parallel processes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key in every point, e.g. --set data.root=PATH")
    p.add_argument("--no-report", action="store_true", help="do not write the report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--launcher", choices=["local", "slurm", "submitit-local"], default="local",
                   help="local: worker processes here (default); slurm: one SLURM job per "
                   "point through submitit; submitit-local: the same jobs on this machine")
    p.add_argument("--launcher-set", dest="launcher_overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a key of the sweep's [launcher] table, "
                   "e.g. --launcher-set partition=gpu (repeatable)")
    p.add_argument("--wait", action="store_true",
                   help="with a job launcher: follow the jobs until all end, then report")
    p.add_argument("--poll", type=float, default=10.0, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="run nothing, write nothing: list "
                   "every run in the order it would start, its state in --out, its epochs "
                   "and an estimate of its time (search steps timed here), then the totals")
    p.add_argument("--bench", metavar="FILE", help="with --dry-run: read ms/step from this "
                   "`slt bench search --json` file instead of timing here")
    p.add_argument("--dry-run-steps", type=int, metavar="N", help="with --dry-run: timed "
                   f"search steps per network, after one warm-up (default: {DRY_RUN_STEPS})")
    p.set_defaults(func=cmd_sweep)
