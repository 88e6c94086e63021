"""The benchmarks' command-line values checked before anything runs: `slt bench topk` and
`slt bench search` refuse a bad count, a missing CUDA device or an unwritable --json file as
one `SltError` line before a single timing."""

from __future__ import annotations

from collections.abc import Sequence

from slt.errors import SltError


def check_json_output(path: str | None) -> None:
    """Refuse an unwritable --json file now, not after the benchmark has run."""
    from slt.fileio import output_file

    if path:
        output_file(path)


def bench_device(choice: str | None) -> str:
    """The device to time on: --device if torch has it, else cuda when seen, else cpu."""
    import torch  # here, not at the top: the wing is reached only by `slt bench`

    device = choice or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SltError("--device cuda, but torch sees no CUDA device")
    return device


def check_topk_options(json_path: str | None, device: str | None, repeats: int,
                       keeps: Sequence[float]) -> str:
    """Check `slt bench topk`'s values (in the command's order); return the device."""
    check_json_output(json_path)
    resolved = bench_device(device)
    if repeats < 1:
        raise SltError(f"--repeats must be at least 1, got {repeats}")
    for keep in keeps:
        if not 0 < keep <= 1:
            raise SltError(f"--keep {keep} outside (0, 1]")
    return resolved


def check_search_options(json_path: str | None, device: str | None, steps: int, warmup: int,
                         block: int, batch: int, threads: int | None) -> str:
    """Check `slt bench search`'s values (in the command's order); return the device."""
    check_json_output(json_path)
    resolved = bench_device(device)
    for name, value, least in (("--steps", steps, 1), ("--warmup", warmup, 0),
                               ("--block", block, 1), ("--batch", batch, 1)):
        if value < least:
            raise SltError(f"{name} must be at least {least}, got {value}")
    if threads is not None and threads < 1:
        raise SltError(f"--threads must be at least 1, got {threads}")
    return resolved
