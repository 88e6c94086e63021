"""Many runs: the sweep grid, one point, the local worker pool, SLURM jobs, records and
status. Each point is an ordinary run directory."""

from slt.sweeps.grid import load_sweep
from slt.sweeps.local import launch_sweep, run_sweep
from slt.sweeps.status import sweep_status

__all__ = ["launch_sweep", "load_sweep", "run_sweep", "sweep_status"]
