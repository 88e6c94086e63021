"""The kernel checks itself: faulty kernels injected on the CPU are caught, named once in the
log, and replaced by the torch path; layouts past the kernel's 32-bit counts never reach it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from torch import Tensor

from slt import resolve
from slt.errors import NonFiniteScoreError
from slt.topk import kernel as cuda_topk
from slt.topk.kernel import KernelGate, check_kernel, layout_limit
from slt.topk.op import _kernel_or_torch, check_deferred, deferred_checks
from slt.topk.torch_path import _select
from slt.topk.torch_path import torch_segmented as _torch_segmented
from tests import kernel_model

CPU = torch.device("cpu")
Select = Callable[[Tensor, Sequence[int], Sequence[int]], Tensor]


def as_kernel(select: Select) -> cuda_topk.KernelFn:
    """A kernel with the binding's contract, (mask, int32 flag), around a mask function."""
    def kernel(values: Tensor, offsets: list[int], ks: list[int]) -> tuple[Tensor, Tensor]:
        if not bool(torch.isfinite(values.float()).all()):
            return torch.zeros(values.numel(), dtype=torch.bool), torch.ones(1, dtype=torch.int32)
        return select(values, offsets, ks), torch.zeros(1, dtype=torch.int32)
    return kernel


def high_index_ties(values: Tensor, offsets: Sequence[int], ks: Sequence[int]) -> Tensor:
    """Exact k, but equal values resolved toward the higher index."""
    out = torch.empty(values.numel(), dtype=torch.bool)
    for i, k in enumerate(ks):
        lo, hi = offsets[i], offsets[i + 1]
        out[lo:hi] = _select(values[lo:hi].flip(0), k).flip(0)
    return out


def bf16_through_fp16(values: Tensor, offsets: Sequence[int], ks: Sequence[int]) -> Tensor:
    """Right for fp32 and fp16; converts bf16 through fp16 (a wrong to_float overload), which
    flushes bf16's tiny values to zero. (Reading bf16 bits as fp16 would not do: both formats
    are sign-magnitude, so the bits order alike.)"""
    if values.dtype == torch.bfloat16:
        values = values.to(torch.float16)
    return _torch_segmented(values, offsets, ks)


class Counting:
    """Wraps a kernel to count its launches, and can be told to raise from launch n on."""

    def __init__(self, kernel: cuda_topk.KernelFn, fail_from: int | None = None,
                 error: Exception | None = None) -> None:
        self.kernel, self.fail_from, self.error, self.calls = kernel, fail_from, error, 0

    def __call__(self, values: Tensor, offsets: list[int], ks: list[int]):
        self.calls += 1
        if self.fail_from is not None and self.calls >= self.fail_from:
            raise self.error or RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.kernel(values, offsets, ks)


def raising(values: Tensor, offsets: list[int], ks: list[int]):
    raise RuntimeError("slt top-k kernel launch failed: no kernel image is available for "
                       "execution on the device")


CORRECT = as_kernel(_torch_segmented)
BATTERY = len(cuda_topk.self_check_battery()) * len(cuda_topk.DTYPE_NAMES)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "slt" and r.levelno == logging.WARNING]


def workload() -> tuple[Tensor, list[int], list[int]]:
    """Values with ties at the cut, in several segments: any tie rule but ours shows."""
    values = torch.randint(0, 5, (9000,), generator=torch.Generator().manual_seed(3)).float()
    return values, [0, 100, 100, 5000, 9000], [40, 0, 2500, 1999]


def assert_torch_path_from_now_on(gate: KernelGate, kernel: Counting) -> None:
    values, offsets, ks = workload()
    before = kernel.calls
    for _ in range(3):
        assert torch.equal(_kernel_or_torch(values, offsets, ks, gate),
                           _torch_segmented(values, offsets, ks))
    assert kernel.calls == before  # never asked again


# --- the verdict on injected kernels ---------------------------------------------------------

def test_ties_to_the_higher_index_are_caught(caplog) -> None:
    kernel = Counting(as_kernel(high_index_ties))
    gate = KernelGate(lambda device: kernel)
    assert gate.kernel(CPU) is None
    assert gate.kernel(CPU) is None
    assert_torch_path_from_now_on(gate, kernel)
    (message,) = warnings_of(caplog)
    assert "self-check on cpu (fp32, ties straddling the cut: " in message
    assert "mask entries differ (and " in message and "using the torch path" in message
    assert gate.disabled is not None and "fp32, ties straddling the cut" in gate.disabled


def test_a_kernel_wrong_only_for_bf16_is_caught(caplog) -> None:
    assert check_kernel(as_kernel(bf16_through_fp16), CPU) == (
        "bf16, signed zeros and denormals: 60 of 900 mask entries differ")
    kernel = Counting(as_kernel(bf16_through_fp16))
    gate = KernelGate(lambda device: kernel)
    assert gate.kernel(CPU) is None
    assert kernel.calls == BATTERY  # fp32 and fp16 passed; every bf16 case was run
    assert_torch_path_from_now_on(gate, kernel)
    bf16 = workload()[0].bfloat16()
    assert torch.equal(_kernel_or_torch(bf16, [0, 9000], [4500], gate),
                       _torch_segmented(bf16, [0, 9000], [4500]))
    (message,) = warnings_of(caplog)
    assert "(bf16, signed zeros and denormals: " in message
    assert "fp32" not in message and "fp16," not in message


def test_a_kernel_that_raises_on_first_launch_is_caught(caplog) -> None:
    assert check_kernel(raising, CPU) == (
        "fp32, several segments: raised RuntimeError: slt top-k kernel launch failed: no kernel "
        "image is available for execution on the device")
    kernel = Counting(raising)
    gate = KernelGate(lambda device: kernel)
    assert gate.kernel(CPU) is None
    assert kernel.calls == 1  # the first launch ends the check
    values, offsets, ks = workload()
    assert torch.equal(_kernel_or_torch(values, offsets, ks, gate),
                       _torch_segmented(values, offsets, ks))
    assert kernel.calls == 1
    (message,) = warnings_of(caplog)
    assert message == ("slt: CUDA top-k kernel failed its self-check on cpu (fp32, several "
                       "segments: raised RuntimeError: slt top-k kernel launch failed: no kernel "
                       "image is available for execution on the device); using the torch path")


def test_a_correct_kernel_is_used_and_checked_once_per_device(caplog) -> None:
    assert check_kernel(CORRECT, CPU) is None
    kernel = Counting(CORRECT)
    builds: list[torch.device] = []
    gate = KernelGate(lambda device: builds.append(device) or kernel)
    rng = torch.get_rng_state()
    assert gate.kernel(CPU) is kernel
    assert torch.equal(torch.get_rng_state(), rng)  # the check draws from its own generator
    assert kernel.calls == BATTERY and builds == [CPU]
    values, offsets, ks = workload()
    for _ in range(3):
        assert torch.equal(_kernel_or_torch(values, offsets, ks, gate),
                           _torch_segmented(values, offsets, ks))
    assert kernel.calls == BATTERY + 3 and builds == [CPU]  # no second check, no rebuild
    assert gate.disabled is None and warnings_of(caplog) == []


def test_the_battery_is_small_and_covers_the_named_cases() -> None:
    battery = cuda_topk.self_check_battery()
    names = [name for name, *_ in battery]
    assert names == ["several segments", "ties straddling the cut", "all-equal values",
                     "signed zeros and denormals", "k = 0 and k = n",
                     "empty and one-element segments", "global single segment",
                     "non-finite values"]
    assert sum(values.numel() for _, values, _, _ in battery) < 60_000
    sizes = {n for _, _, offsets, _ in battery for n in torch.tensor(offsets).diff().tolist()}
    assert {0, 1} <= sizes and max(sizes) > 2 * cuda_topk.CHUNK  # segments over several chunks
    ks = {(k, n) for _, _, offsets, kk in battery
          for k, n in zip(kk, torch.tensor(offsets).diff().tolist())}
    assert any(k == 0 < n for k, n in ks) and any(k == n > 0 for k, n in ks)
    _, values, offsets, ks_ties = battery[1]
    first, k = values[:offsets[1]], ks_ties[0]
    threshold = torch.sort(first, descending=True).values[k - 1]
    tied = (first == threshold).nonzero().flatten()
    kept_ties = tied[:k - int((first > threshold).sum())]
    assert 0 < kept_ties.numel() < tied.numel()  # the cut splits a run of equal values...
    assert kept_ties.min() < cuda_topk.CHUNK <= kept_ties.max()  # ...across a chunk edge
    with pytest.raises(NonFiniteScoreError):
        _torch_segmented(*battery[-1][1:])


def model_kernel(values: Tensor, offsets: list[int], ks: list[int]) -> tuple[Tensor, Tensor]:
    """The kernel's numpy model (tests/kernel_model.py) behind the kernel's contract."""
    launch = kernel_model.launch(values, offsets, ks)
    return torch.from_numpy(launch.mask), torch.tensor([int(launch.error)], dtype=torch.int32)


def test_the_kernels_model_passes_the_self_check() -> None:
    assert check_kernel(model_kernel, CPU) is None


def test_the_self_check_catches_a_kernel_that_keeps_minus_zero_apart(monkeypatch) -> None:
    """The model with key_of's -0 folding removed: -0 sorts below +0, and the check says so."""
    def unfolded_key_of(values: np.ndarray) -> np.ndarray:
        bits = values.astype(np.float32).view(np.uint32)
        return np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)

    monkeypatch.setattr(kernel_model, "key_of", unfolded_key_of)
    failure = check_kernel(model_kernel, CPU)
    assert failure.startswith("fp32, signed zeros and denormals: ")


# --- failures after the check ----------------------------------------------------------------

def test_a_later_launch_failure_warns_once_and_falls_back(caplog) -> None:
    kernel = Counting(CORRECT, fail_from=BATTERY + 2)
    gate = KernelGate(lambda device: kernel)
    values, offsets, ks = workload()
    expected = _torch_segmented(values, offsets, ks)
    assert torch.equal(_kernel_or_torch(values, offsets, ks, gate), expected)  # the kernel's
    assert warnings_of(caplog) == []
    for _ in range(3):  # the first of these raises inside; all come from the torch path
        assert torch.equal(_kernel_or_torch(values, offsets, ks, gate), expected)
    assert kernel.calls == BATTERY + 2
    (message,) = warnings_of(caplog)
    assert message == ("slt: CUDA top-k kernel failed on launch (CUDA error: an illegal memory "
                       "access was encountered); using the torch path")


def test_out_of_memory_is_not_blamed_on_the_kernel(caplog) -> None:
    kernel = Counting(CORRECT, fail_from=BATTERY + 1, error=torch.OutOfMemoryError("OOM"))
    gate = KernelGate(lambda device: kernel)
    with pytest.raises(torch.OutOfMemoryError):
        _kernel_or_torch(*workload(), gate)
    assert gate.disabled is None and warnings_of(caplog) == []


def test_a_false_non_finite_flag_disables_the_kernel(caplog) -> None:
    def lying(values: Tensor, offsets: list[int], ks: list[int]):
        mask, error = CORRECT(values, offsets, ks)
        return mask, torch.ones(1, dtype=torch.int32) if values.numel() == 9000 else error

    gate = KernelGate(lambda device: lying)
    values, offsets, ks = workload()
    assert torch.equal(_kernel_or_torch(values, offsets, ks, gate),
                       _torch_segmented(values, offsets, ks))
    (message,) = warnings_of(caplog)
    assert "flagged finite values as non-finite" in message and gate.kernel(CPU) is None


def test_a_true_non_finite_flag_raises_with_the_index() -> None:
    gate = KernelGate(lambda device: CORRECT)
    values, offsets, ks = workload()
    values[4321] = float("nan")
    with pytest.raises(NonFiniteScoreError, match="flat index 4321"):
        _kernel_or_torch(values, offsets, ks, gate)
    assert gate.disabled is None


def test_a_failed_build_warns_once(caplog) -> None:
    def no_nvcc(device: torch.device):
        raise RuntimeError("Error building extension 'slt_topk_sm86'\nnvcc: not found")

    gate = KernelGate(no_nvcc)
    for _ in range(3):
        assert torch.equal(_kernel_or_torch(*workload(), gate), _torch_segmented(*workload()))
    assert warnings_of(caplog) == [
        "slt: CUDA top-k kernel unavailable (nvcc: not found); using the torch path"]


# --- the 32-bit limits -----------------------------------------------------------------------

class Offsets(Sequence):
    """Offsets of `count` equal segments of `size` values, without allocating them."""

    def __init__(self, count: int, size: int) -> None:
        self.count, self.size = count, size

    def __len__(self) -> int:
        return self.count + 1

    def __getitem__(self, i):
        if not 0 <= i <= self.count:
            raise IndexError(i)
        return i * self.size


def test_layout_limit_names_what_does_not_fit() -> None:
    assert layout_limit([0, 2**32 - 1]) is None  # counts up to 2^32 - 1 fit in uint32
    assert layout_limit([0, 5, 5 + 2**32 - 1, 2 * 2**32]) is None
    assert layout_limit([0, 2**32]) == (
        "segment 0 holds 4294967296 values, the kernel counts in uint32 (< 2^32)")
    assert layout_limit([0, 7, 7, 7 + 2**33]).startswith("segment 2 holds 8589934592 values")
    assert layout_limit(Offsets(2**31, 1)) == (
        "2147483648 segments exceed the kernel's int32 segment count")
    # 2048 segments of 2^32 - 1 values: 2^20 chunks each, 2^31 in all
    assert layout_limit(Offsets(2047, 2**32 - 1)) is None
    assert layout_limit(Offsets(2048, 2**32 - 1)) == (
        "2147483648 chunks exceed the kernel's int32 chunk count")
    assert layout_limit([0]) is None and layout_limit([0, 0, 0]) is None


def test_layouts_past_the_limits_take_the_torch_path(monkeypatch) -> None:
    """With the limit lowered to 64 values a segment, a 100-value segment never reaches the
    kernel (the real limit would need 2^32 values)."""
    kernel = Counting(CORRECT)
    gate = KernelGate(lambda device: kernel)
    assert gate.kernel(CPU) is kernel
    monkeypatch.setattr(cuda_topk, "SEGMENT_LIMIT", 64)
    values = torch.randint(0, 3, (160,), generator=torch.Generator().manual_seed(4)).float()
    calls = kernel.calls
    assert torch.equal(_kernel_or_torch(values, [0, 100, 160], [50, 30], gate),
                       _torch_segmented(values, [0, 100, 160], [50, 30]))
    assert kernel.calls == calls
    _kernel_or_torch(values, [0, 60, 120, 160], [50, 30, 3], gate)  # every segment fits
    assert kernel.calls == calls + 1


# --- the non-finite flag, read when the search loop chooses ---------------------------------


class NoWait:
    """A device flag whose read would make the host wait: reading it per call fails."""

    def __init__(self, value: int) -> None:
        self.value = torch.tensor([value], dtype=torch.int32)

    def item(self) -> int:
        raise AssertionError("the flag was read right after the launch")

    def max(self) -> Tensor:
        return self.value.max()


def test_under_deferred_checks_the_flag_is_read_only_when_asked() -> None:
    def flagging(values: Tensor, offsets: list[int], ks: list[int]):
        mask, error = CORRECT(values, offsets, ks)
        return mask, NoWait(1 if bool(torch.isnan(values).any()) else 0)

    values, offsets, ks = workload()
    gate = KernelGate(lambda device: CORRECT)
    assert gate.kernel(CPU) is CORRECT  # verified by the battery first
    gate.verified[CPU] = flagging
    with deferred_checks():
        assert torch.equal(_kernel_or_torch(values, offsets, ks, gate),
                           _torch_segmented(values, offsets, ks))  # no read, no raise
        check_deferred(gate)  # nothing flagged
        bad = values.clone()
        bad[7] = float("nan")
        _kernel_or_torch(bad, offsets, ks, gate)  # flagged: kept for later, not raised
        with pytest.raises(NonFiniteScoreError, match="since the last check"):
            check_deferred(gate)
        check_deferred(gate)  # read once: cleared
    with pytest.raises(AssertionError, match="read right after"):
        _kernel_or_torch(values, offsets, ks, gate)  # outside: read at once, as before
    assert gate.disabled is None


def test_a_flag_found_at_a_checkpoint_stops_the_search_before_it_writes(tmp_path,
                                                                         monkeypatch) -> None:
    from slt import config
    from slt.engine.run import run_search
    from slt.errors import SltError
    from tests.conftest import TINY

    asked = []
    monkeypatch.setattr(cuda_topk.GATE, "take_pending", lambda: asked.append(1) or True)
    cfg = resolve.load("quick.toml", [*TINY, "run.checkpoint_every=2"])
    with pytest.raises(SltError, match="epoch 1: a score became NaN or infinite since the last "
                       "check .*the search diverged"):
        run_search(cfg, tmp_path, log=lambda _: None)
    run_dir = tmp_path / config.run_id(cfg)
    assert asked == [1] and not (run_dir / "checkpoint.pt").exists()
    assert "the search diverged" in (run_dir / "error.json").read_text()
