"""`slt doctor`: versions, devices, the CUDA kernel's self-check and speed, a short search."""

from slt.doctor.report import Doctor, Report, main, run_doctor

__all__ = ["Doctor", "Report", "main", "run_doctor"]
