"""`slt bench topk|search`: the benchmarks' arguments and handlers, apart from cli.py so
that the bench wing (and torch) is imported only when a benchmark runs."""

from __future__ import annotations

import argparse


def cmd_bench_topk(args: argparse.Namespace) -> int:
    """`slt bench topk`: the values checked by the bench wing, then the timings."""
    from slt.bench.options import check_topk_options
    from slt.bench.topk import run_topk_bench

    device = check_topk_options(args.json, args.device, args.repeats, args.keep)
    run_topk_bench(args.layers, args.keep, args.repeats, args.json, device,
                   tuple(args.scope), args.dtype)
    return 0


def cmd_bench_search(args: argparse.Namespace) -> int:
    """`slt bench search`: the values checked by the bench wing, then the timings."""
    from slt.bench.options import check_search_options
    from slt.bench.search import default_modes, run_search_bench

    device = check_search_options(args.json, args.device, args.steps, args.warmup, args.block,
                                  args.batch, args.threads)
    run_search_bench(args.model, args.input, args.modes or default_modes(device), args.batch,
                     args.keep, args.source_density, args.steps, args.warmup, args.block,
                     device, args.json, args.overrides, args.threads)
    return 0


def bench_parser(sub: argparse._SubParsersAction) -> None:
    """`slt bench topk|search`: the mask op, and search steps against dense training."""
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    b = bsub.add_parser("topk", help="top-k masking: slt.topk against per-layer sort, topk, "
                        "kthvalue and the memory floor")
    b.add_argument("--layers", nargs="+",
                   default=["conv6", "resnet18", "resnet50", "2^16", "2^20", "2^24"],
                   help="workloads: the prunable layers of lenet-300-100, conv6, resnet18 or "
                   "resnet50, or one tensor of 2^N elements (e.g. 2^26)")
    b.add_argument("--keep", nargs="+", type=float, default=[0.5, 0.1],
                   help="fraction of each segment kept")
    b.add_argument("--scope", nargs="+", choices=["layer", "global"], default=["layer", "global"],
                   help="one segment per layer, or one for all layers")
    b.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: cuda when torch sees one, else cpu")
    b.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    b.add_argument("--repeats", type=int, default=15, help="timed repetitions (median)")
    b.add_argument("--json", help="also write the rows to this JSON file")
    b.set_defaults(func=cmd_bench_topk)
    b = bsub.add_parser("search", help="training throughput of a search step against dense "
                        "training of the same architecture, per speed mode")
    b.add_argument("--model", nargs="+", default=["conv4", "resnet18"],
                   help="models from slt's registry (e.g. mlp, conv4, resnet18) or references "
                   "with their factory's arguments after commas (torchvision:resnet18, "
                   "timm:vit_tiny_patch16_224,img_size=32,patch_size=4)")
    b.add_argument("--input", nargs="+", default=["32"],
                   help="input size: S for 3xSxS images, SxC for C channels (e.g. 28x1)")
    b.add_argument("--batch", type=int, default=128, help="batch size (default: 128)")
    b.add_argument("--modes", nargs="+", help="speed modes: fp32, bf16 or fp16, then +flags "
                   "channels_last (cl), compile, nondet; e.g. bf16+channels_last+compile "
                   "(default: fp32 bf16 on the CPU; fp32 bf16 bf16+channels_last on CUDA)")
    b.add_argument("--keep", type=float, default=0.5,
                   help="fraction of source edges the ticket keeps (default: 0.5)")
    b.add_argument("--source-density", type=float, default=1.0,
                   help="source density (default: 1.0, a dense source, as edge-popup)")
    b.add_argument("--steps", type=int, default=10, help="timed steps per side (median)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    b.add_argument("--block", type=int, default=1,
                   help="steps per side before the other side takes its turn")
    b.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: cuda when torch sees one, else cpu")
    b.add_argument("--threads", type=int,
                   help="torch CPU threads (default: the cores this process may use)")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="other config keys, e.g. --set model.width=0.5 --set search.scope=global")
    b.add_argument("--json", help="also write the rows to this JSON file")
    b.set_defaults(func=cmd_bench_search)
