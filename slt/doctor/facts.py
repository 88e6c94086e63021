"""What `slt doctor` reads without timing anything: versions, the CPU, the CUDA devices.

Each fact is read in a way that cannot take the command down: a package that fails to
import, or a GPU torch cannot use, becomes a sentence in the report, not a traceback.
"""

from __future__ import annotations

import platform
import re
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from slt import __version__
from slt.engine.hardware import NATIVE_FLAGS, cpu_info
from slt.errors import first_line

# Optional packages of slt's extras (pyproject.toml), read from their metadata, never imported.
EXTRAS = {"matplotlib": "plot", "submitit": "slurm", "tensorboard": "tb", "onnx": "onnx",
          "onnxscript": "onnx", "onnxruntime": "onnx export tests", "timm": "timm"}
# CPU flags worth naming: the vector extensions torch's CPU kernels choose between.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                "amx_int8", "amx_fp16", "asimd", "sve", "sve2", "bf16", "i8mm")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """Python, torch (its CUDA, cuDNN and NCCL), torchvision, slt and the extras present."""
    facts: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "slt": __version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": None, "nccl": None, "torchvision": None, "torchvision_error": None,
    }
    try:
        facts["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # a CPU build answers None; a broken one must not stop the report
        facts["cudnn"] = None
    if torch.cuda.is_available():
        try:
            facts["nccl"] = ".".join(str(n) for n in torch.cuda.nccl.version())
        except Exception:
            facts["nccl"] = None
    try:  # torchvision can be installed and still not load beside this torch
        import torchvision

        facts["torchvision"] = torchvision.__version__
    except Exception as exc:
        facts["torchvision"] = _version("torchvision")
        facts["torchvision_error"] = f"{type(exc).__name__}: {first_line(exc)}"
    facts["extras"] = {name: _version(name) for name in EXTRAS}
    return facts


def cpu_facts() -> dict[str, Any]:
    """The CPU as torch sees it: model, torch's kernel level, the vector extensions, and
    whether bf16 arithmetic is native (AVX-512 BF16 or AMX-BF16 with torch's AVX-512
    kernels) or emulated."""
    cpu = cpu_info()
    native = cpu.native("bf16")
    return {
        "model": cpu.model, "arch": cpu.arch, "torch_capability": cpu.capability,
        "threads": torch.get_num_threads(),
        "vector_extensions": [flag for flag in VECTOR_FLAGS if flag in cpu.flags],
        "bf16_native": native,
        "bf16_flags": [flag for flag in NATIVE_FLAGS["bf16"] if flag in cpu.flags],
    }


@dataclass
class CudaDevice:
    """One CUDA device torch counts, and whether it can run anything there."""

    index: int
    name: str = ""
    capability: tuple[int, int] = (0, 0)
    memory_gib: float = 0.0
    multiprocessors: int = 0
    error: str | None = None  # why torch cannot use it; None when a tensor op ran

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.index)

    @property
    def label(self) -> str:
        return f"cuda:{self.index} ({self.name or 'unknown'})"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _arch_supported(capability: tuple[int, int]) -> bool:
    """Whether this torch build carries code that runs on the capability: SASS of the same
    major and a minor no higher (sm_86 runs on 8.9), or PTX of an older one that the driver
    compiles for it. Arch-specific builds (sm_90a) run on exactly their own."""
    arches = torch.cuda.get_arch_list()
    if not arches:
        return True  # unknown: let the tensor op decide
    major, minor = capability
    for arch in arches:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)
        if not m:
            continue
        a_major, a_minor, specific = int(m.group(2)), int(m.group(3)), bool(m.group(4))
        if specific:
            if (a_major, a_minor) == (major, minor):
                return True
        elif m.group(1) == "sm" and a_major == major and a_minor <= minor:
            return True
        elif m.group(1) == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def probe_device(index: int) -> CudaDevice:
    """Name, capability and memory of cuda:index, and a small computation checked there
    (a dot product whose float32 sum is exact in any order)."""
    device = CudaDevice(index)
    try:
        props = torch.cuda.get_device_properties(index)
        device.name = props.name
        device.capability = (props.major, props.minor)
        device.memory_gib = round(props.total_memory / 2**30, 1)
        device.multiprocessors = props.multi_processor_count
        x = torch.arange(1, 257, device=f"cuda:{index}", dtype=torch.float32)
        total = float((x @ x).item())  # 5,625,216 < 2^24: every partial sum is exact
        torch.cuda.synchronize(index)
        if total != 256 * 257 * 513 / 6:
            device.error = f"a dot product came out {total}, not {256 * 257 * 513 // 6}"
    except Exception as exc:  # whatever the driver says is the answer
        device.error = f"{type(exc).__name__}: {first_line(exc)}"
    if device.error and device.name and not _arch_supported(device.capability):
        device.error = (f"torch {torch.__version__} has no code for compute capability "
                        f"{device.capability[0]}.{device.capability[1]} (it carries "
                        f"{' '.join(torch.cuda.get_arch_list())}): {device.error}")
    return device


def cuda_devices() -> list[CudaDevice]:
    """Every CUDA device torch counts, each probed."""
    if not torch.cuda.is_available():
        return []
    return [probe_device(i) for i in range(torch.cuda.device_count())]


def driver_gpus() -> list[str]:
    """NVIDIA GPUs the driver shows, whatever torch thinks: /proc/driver/nvidia/gpus
    entries, else /dev/nvidiaN device files."""
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        found = sorted(str(p) for p in gpus.iterdir())
    except OSError:
        found = []
    if not found:
        found = sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))
    return found


def cuda_unusable() -> str | None:
    """Why torch uses no CUDA device although the driver shows some; None when torch uses
    them or there are none."""
    with warnings.catch_warnings(record=True) as caught:  # torch explains in a warning
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return None
    gpus = driver_gpus()
    if not gpus:
        return None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU build"
    else:
        said = [first_line(w.message) for w in caught]
        why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use them"
               + (f": {said[0]}" if said else " (torch.cuda.is_available() is False)"))
    return f"the driver shows {len(gpus)} NVIDIA GPU(s) ({gpus[0]}), but {why}"
