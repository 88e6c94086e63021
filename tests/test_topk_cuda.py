"""The CUDA kernel against the torch path, bit for bit. Runs only where CUDA is present."""

from __future__ import annotations

import os

import pytest
import torch

from slt import resolve
from slt.errors import NonFiniteScoreError
from slt.topk import kernel as cuda_topk
from slt.topk.op import segmented_topk_mask
from slt.topk.torch_path import torch_segmented as _torch_segmented

pytestmark = pytest.mark.cuda


def offsets_of(sizes: list[int]) -> list[int]:
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out


def check(values: torch.Tensor, sizes: list[int], ks: list[int]) -> None:
    offsets = offsets_of(sizes)
    expected = _torch_segmented(values.cpu().float(), offsets, ks)
    got = segmented_topk_mask(values.cuda(), offsets, ks).cpu()
    assert torch.equal(got, expected)
    assert cuda_topk.GATE.disabled is None  # the kernel ran: it was not replaced by the torch path
    for i, k in enumerate(ks):
        assert int(got[offsets[i]:offsets[i + 1]].sum()) == k


CUDA = torch.device("cuda", 0)


def test_the_kernel_is_what_runs() -> None:
    """It builds for this GPU's arch and passes its self-check, so the op uses it."""
    assert cuda_topk.GATE.kernel(CUDA) is not None, cuda_topk.GATE.disabled
    name, _ = cuda_topk.build_options(torch.cuda.get_device_capability(CUDA),
                                      os.environ.get("TORCH_CUDA_ARCH_LIST"))
    assert cuda_topk.extension(CUDA).__name__ == name


def test_the_kernel_passes_the_self_check_on_every_device() -> None:
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        assert cuda_topk.check_kernel(cuda_topk.build_kernel(device), device) is None


def test_a_segment_past_uint32_takes_the_torch_path(monkeypatch) -> None:
    """The guard, not the kernel, sees a too-large segment (limit lowered: 2^32 values would
    need 8 GiB even in fp16)."""
    monkeypatch.setattr(cuda_topk, "SEGMENT_LIMIT", 1000)
    launches = []
    gate = cuda_topk.KernelGate(lambda device: lambda *a: launches.append(a) or (None, None))
    monkeypatch.setattr(cuda_topk, "GATE", gate)
    values = torch.randint(0, 3, (3000,), generator=GEN).float()
    check(values, [1000, 2000], [10, 1500])
    assert launches == [] and gate.disabled is None


GEN = torch.Generator().manual_seed(0)
INPUTS = {
    "random": lambda n: torch.randn(n, generator=GEN),
    "heavy ties": lambda n: torch.randint(0, 4, (n,), generator=GEN).float(),
    "all equal": lambda n: torch.zeros(n),
    "signed zeros": lambda n: torch.where(torch.rand(n, generator=GEN) < 0.5, 0.0, -0.0),
    "negative": lambda n: -torch.rand(n, generator=GEN),
}


@pytest.mark.parametrize("kind", list(INPUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_torch_path(kind: str, dtype: torch.dtype) -> None:
    sizes = [0, 1, 5, 4096, 4097, 100_000, 7, 1 << 20]
    values = torch.cat([INPUTS[kind](n) for n in sizes]).to(dtype)
    for ks in ([0, 1, 2, 2048, 1, 50_000, 7, 1 << 19], [0, 0, 5, 4096, 0, 1, 0, 1],
               [0, 1, 4, 1, 4097, 99_999, 3, (1 << 20) - 1]):
        check(values, sizes, ks)
    check(values, [values.numel()], [values.numel() // 10])  # global mode


def test_very_unequal_segments_and_large_tensors() -> None:
    for exponent in (16, 20, 24, 26):
        n = 1 << exponent
        values = torch.randn(n, generator=GEN)
        check(values, [3, n - 3], [1, n // 10])


def test_ties_on_either_side_of_the_cut() -> None:
    # blocks of equal values: k at a block edge keeps whole blocks (no tie split, the kernel's
    # >= shortcut); k inside a block ranks the ties by index
    values = torch.arange(8).repeat_interleave(1000).flip(0).float()  # 7,7,...,0,0
    shuffled = values[torch.randperm(values.numel(), generator=GEN)]
    for v in (values, shuffled):
        for k in (0, 1000, 3000, 999, 2500, 7999, 8000):
            check(v, [v.numel()], [k])
            check(v, [4000, 4000], [min(k, 4000), k // 2])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_is_an_error(bad: float) -> None:
    values = torch.ones(10_000, device="cuda")
    values[1234] = bad
    with pytest.raises(NonFiniteScoreError, match="flat index 1234"):
        segmented_topk_mask(values, [0, 5000, 10_000], [0, 5000])  # k=0 and k=n segments too


def test_search_gives_the_same_ticket_with_either_path(tmp_path, tiny_overrides,
                                                       monkeypatch) -> None:
    from slt import ticket
    from slt.engine.run import run_search

    cfg = resolve.load(None, [*tiny_overrides, "run.device=cuda", "model.hidden=[64, 64]"])
    with_kernel = run_search(cfg, tmp_path / "kernel", log=lambda _: None)
    torch_only = cuda_topk.KernelGate(cuda_topk.build_kernel)
    torch_only.disabled = "turned off by the test"  # silently: no warning
    monkeypatch.setattr(cuda_topk, "GATE", torch_only)
    with_torch = run_search(cfg, tmp_path / "torch", log=lambda _: None)
    a = ticket.load(with_kernel.run_dir / "ticket.slt")
    b = ticket.load(with_torch.run_dir / "ticket.slt")
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.mask, lb.mask)
