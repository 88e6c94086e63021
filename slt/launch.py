"""The home of `PointJob` before the sweeps wing (slt 0.1), kept for one release.

submitit pickles a queued job by its class's import path, `slt.launch.PointJob`; a job queued,
or requeued after a preemption, before the move still unpickles and runs here. New code
imports `slt.sweeps.slurm.PointJob`.
"""

from slt.sweeps.slurm import PointJob

__all__ = ["PointJob"]
