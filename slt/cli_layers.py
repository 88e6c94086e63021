"""`slt layers`: a config's network, parameter by parameter, before anything runs."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def cmd_layers(args: argparse.Namespace) -> int:
    from slt.overview import format_overview, known_spec, overview
    from slt.resolve import load

    cfg = load(args.config, args.overrides)
    shape = tuple(int(n) for n in args.input.split("x")) if args.input else None
    spec = known_spec(cfg.data, shape, args.classes)
    rows = overview(cfg, spec)
    print(format_overview(cfg, spec, rows))
    if args.json:
        print(json.dumps([{**asdict(r), "numel": r.numel} for r in rows]))
    return 0


def _input_shape(text: str) -> str:
    parts = text.split("x")
    if not all(p.isdigit() and int(p) > 0 for p in parts) or len(parts) > 4:
        raise argparse.ArgumentTypeError(f"expected sizes joined by x (3x224x224), got {text!r}")
    return text


def layers_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layers", help="every parameter of a config's model: shape, role "
                       "(searched, frozen, constant, learned), source density and edges")
    p.add_argument("--config", help="TOML config (a path or a packaged name; default: the "
                   "defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.name=torchvision:resnet18")
    p.add_argument("--input", type=_input_shape, help="the data's example shape, e.g. "
                   "3x224x224 (known for mnist, fashion_mnist, cifar10/100, planted_teacher)")
    p.add_argument("--classes", type=int, help="the data's class count (with --input)")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.set_defaults(func=cmd_layers)
