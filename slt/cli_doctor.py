"""`slt doctor`: one screen on whether slt works on this machine, and how fast."""

from __future__ import annotations

import argparse


def cmd_doctor(args: argparse.Namespace) -> int:
    from slt.doctor import Doctor, main

    if args.steps < 1:
        from slt.errors import SltError

        raise SltError(f"--steps must be at least 1, got {args.steps}")
    return main(Doctor(steps=args.steps, search=not args.no_search), args.json)


def doctor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="versions, devices, the CUDA kernel's self-check and "
                       "timing, a short search per device; exit 1 when a check fails")
    p.add_argument("--json", help="also write everything to this JSON file")
    p.add_argument("--steps", type=int, default=20,
                   help="timed Conv-4 search steps per precision and device (default: 20; "
                   "fewer when 15 s run out)")
    p.add_argument("--no-search", action="store_true", help="skip the search timing")
    p.set_defaults(func=cmd_doctor)
