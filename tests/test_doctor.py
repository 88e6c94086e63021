"""`slt doctor`: the real report on this machine (no CUDA here: the torch-path line), its JSON,
and the verdicts on injected devices and kernels (a kernel failing its self-check, one that
does not build, a GPU torch cannot use) with their exit status and one stderr line."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch

from slt.cli import main as cli_main
from slt.doctor import Doctor, facts
from slt.doctor.facts import CudaDevice
from slt.engine.hardware import cpu_info
from tests.test_faults_kernel import CORRECT, as_kernel, bf16_through_fp16

CPU = torch.device("cpu")


class OnCpu(CudaDevice):
    """A stand-in GPU whose kernel runs on the CPU: the doctor's verdicts without CUDA."""

    @property
    def device(self) -> torch.device:
        return CPU


def injected(monkeypatch, kernel=None, build_error: Exception | None = None,
             devices: list[CudaDevice] | None = None) -> None:
    """`slt doctor` (through the CLI) sees `devices` and builds `kernel` for them."""
    def make(device: torch.device):
        if build_error is not None:
            raise build_error
        return kernel
    if devices is None:
        devices = [OnCpu(0, "Injected GPU", (9, 0), 80.0, 132)]
    monkeypatch.setattr("slt.doctor.Doctor", functools.partial(
        Doctor, make_kernel=make, devices=lambda: devices, kernel_layers="lenet-300-100"))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="states the CPU-only machine's case")
def test_doctor_on_a_machine_without_cuda(tmp_path) -> None:
    out = tmp_path / "doctor.json"
    proc = subprocess.run([sys.executable, "-m", "slt.cli", "doctor", "--steps", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device present" in proc.stdout and "torch path" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("ok: every check that applies "
                                                           "passed (")
    assert "FAILED" not in proc.stderr and "Traceback" not in proc.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["exit_code"] == 0 and report["failed"] == []
    assert report["versions"]["torch"] == torch.__version__
    import torchvision
    assert report["versions"]["torchvision"] == torchvision.__version__
    assert report["cpu"]["bf16_native"] == cpu_info().native("bf16")
    assert report["cuda_devices"] == []
    search = {c["name"]: c for c in report["checks"]}["search cpu"]
    assert search["status"] == "pass"
    rows = search["data"]["timings"]
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    assert all(r["steps"] == 2 and len(r["step_ms"]) == 2 and r["median_ms"] > 0 for r in rows)
    ratio = search["data"]["bf16_over_fp32"]
    assert ratio == pytest.approx(rows[1]["median_ms"] / rows[0]["median_ms"])
    bf16 = {c["name"]: c for c in report["checks"]}["cpu bf16"]
    assert bf16["data"]["bf16_over_fp32"] == ratio
    assert ("faster here" in bf16["line"]) == (ratio <= 1.0)


def test_a_kernel_failing_its_self_check_fails_the_doctor(monkeypatch, capsys, tmp_path):
    injected(monkeypatch, kernel=as_kernel(bf16_through_fp16))
    out = tmp_path / "d.json"
    assert cli_main(["doctor", "--no-search", "--json", str(out)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("slt doctor: FAILED: cuda:0 (Injected GPU): the CUDA top-k kernel "
                             "failed its self-check (bf16, signed zeros and denormals: ")
    report = json.loads(out.read_text())
    assert report["exit_code"] == 1 and report["ok"] is False
    kernel = {c["name"]: c for c in report["checks"]}["kernel cpu"]
    assert kernel["status"] == "fail" and kernel["data"]["self_check"].startswith("bf16, ")
    assert "timings" not in kernel["data"]  # a wrong kernel is not timed


def test_a_kernel_that_does_not_build_is_a_note_not_a_failure(monkeypatch, capsys) -> None:
    """Searches are right on the torch path, only slower: a node without nvcc passes."""
    injected(monkeypatch, build_error=RuntimeError(
        "Error building extension 'slt_topk_sm100'\n[1/3] /usr/local/cuda/bin/nvcc ...\n"
        "nvcc fatal : Unsupported gpu architecture 'compute_100'\nninja: build stopped"))
    assert cli_main(["doctor", "--no-search"]) == 0
    captured = capsys.readouterr()
    assert ("  note  cuda:0 (Injected GPU): the CUDA top-k kernel does not build (RuntimeError: "
            "nvcc fatal : Unsupported gpu architecture 'compute_100'); searches run on the "
            "torch path, slower") in captured.out
    assert "FAILED" not in captured.err


def test_a_kernel_that_raises_past_the_self_check_fails_the_doctor(monkeypatch, capsys):
    def big_fails(values, offsets, ks):
        if values.numel() > 100_000:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return CORRECT(values, offsets, ks)
    injected(monkeypatch, kernel=big_fails)
    assert cli_main(["doctor", "--no-search"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["slt doctor: FAILED: cuda:0 (Injected GPU): the CUDA top-k kernel passed its "
                   "self-check but raised on lenet-300-100 (RuntimeError: CUDA error: an "
                   "illegal memory access was encountered)"]


def test_a_kernel_that_agrees_passes_and_is_timed(monkeypatch, capsys, tmp_path) -> None:
    injected(monkeypatch, kernel=CORRECT)
    out = tmp_path / "d.json"
    assert cli_main(["doctor", "--no-search", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "cuda:0 (Injected GPU): compute capability 9.0, 80.0 GiB" in captured.out
    kernel = {c["name"]: c for c in json.loads(out.read_text())["checks"]}["kernel cpu"]
    assert kernel["status"] == "pass" and kernel["data"]["self_check"] == "passed"
    rows = kernel["data"]["timings"]
    assert [r["scope"] for r in rows] == ["layer", "global"]
    assert [r["segments"] for r in rows] == [3, 1]  # LeNet-300-100's three layers, then one
    assert all(r["n"] == 266_200 for r in rows)
    for r in rows:
        assert r["x_topk"] == pytest.approx(r["topk_ms"] / r["kernel_ms"])
        assert r["x_sort"] == pytest.approx(r["sort_ms"] / r["kernel_ms"])


def test_a_gpu_torch_cannot_use_fails_the_doctor(monkeypatch, capsys) -> None:
    broken = CudaDevice(0, "NVIDIA B300", (10, 3), 270.0, 148,
                        error="torch 2.11.0 has no code for compute capability 10.3")
    injected(monkeypatch, kernel=CORRECT, devices=[broken])
    assert cli_main(["doctor", "--no-search"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["slt doctor: FAILED: cuda:0 (NVIDIA B300): torch cannot use it: torch "
                   "2.11.0 has no code for compute capability 10.3"]


def test_gpus_the_driver_shows_but_torch_does_not_fail_the_doctor(monkeypatch, capsys):
    monkeypatch.setattr(facts, "driver_gpus", lambda: ["/proc/driver/nvidia/gpus/0000:17:00.0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    why = facts.cuda_unusable()
    assert why is not None and why.startswith("the driver shows 1 NVIDIA GPU(s) "
                                              "(/proc/driver/nvidia/gpus/0000:17:00.0), but ")
    assert cli_main(["doctor", "--no-search"]) == 1
    assert capsys.readouterr().err.strip() == f"slt doctor: FAILED: {why}"


def test_which_compute_capabilities_a_torch_build_runs_on(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_86", "sm_90"])
    assert facts._arch_supported((8, 0)) and facts._arch_supported((9, 0))
    assert facts._arch_supported((8, 9))  # sm_86 code runs on 8.9 (L4, L40S, RTX 4090)
    assert not facts._arch_supported((10, 0)) and not facts._arch_supported((7, 5))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90a", "compute_90"])
    assert facts._arch_supported((10, 0))  # compute_90's PTX compiles for it
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90a"])
    assert facts._arch_supported((9, 0)) and not facts._arch_supported((10, 0))
    assert not facts._arch_supported((7, 0))


def test_bad_arguments_are_one_line_before_anything_runs(tmp_path, capsys) -> None:
    assert cli_main(["doctor", "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "slt: error: --steps must be at least 1, got 0"
    folder = tmp_path / "a folder"
    folder.mkdir()
    assert cli_main(["doctor", "--json", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"slt: error: cannot write {folder}: it is a "
                                               "folder")


@pytest.mark.cuda
def test_doctor_on_this_gpu(tmp_path) -> None:
    out = tmp_path / "doctor.json"
    assert cli_main(["doctor", "--steps", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    for index in range(torch.cuda.device_count()):
        kernel = checks[f"kernel cuda:{index}"]
        assert kernel["status"] == "pass" and kernel["data"]["self_check"] == "passed"
        assert len(kernel["data"]["timings"]) == 2
        assert checks[f"search cuda:{index}"]["status"] == "pass"
