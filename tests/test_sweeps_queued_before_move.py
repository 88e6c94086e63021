"""A SLURM job queued by slt before its modules moved into wings still runs after the move.

`tests/data/pointjob-before-wings.pkl` is the submission submitit pickled for one sweep point
under slt 0.1 (commit d8d156f, `slt.launch.PointJob` of a 1-epoch quick.toml point, out root
"runs"): exactly what a queued or requeued job reads when it starts. Here submitit's own job
runner loads it, as on a compute node, and the point's search must finish.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slt import resolve
from slt.config import run_id

pytest.importorskip("submitit")

FIXTURE = Path(__file__).parent / "data" / "pointjob-before-wings.pkl"
OLD_RUN_ID = "planted_teacher-mlp-d0.5-t0.25-a179889be7c9"


def test_the_old_pickle_names_the_old_module() -> None:
    """The fixture really is a job of the old layout (else this test proves nothing)."""
    blob = FIXTURE.read_bytes()
    assert b"slt.launch" in blob and b"PointJob" in blob
    assert b"slt.sweeps" not in blob


def test_a_job_queued_before_the_move_unpickles_to_todays_class() -> None:
    from slt.sweeps.slurm import PointJob

    delayed = pickle.loads(FIXTURE.read_bytes())
    assert type(delayed.function) is PointJob
    assert delayed.function.out_root == "runs"
    (cfg,) = delayed.args
    same = resolve.load("quick.toml", ["search.epochs=1", "data.train_size=512",
                                       "data.test_size=256", "run.progress=false"])
    assert cfg == same and run_id(cfg) == OLD_RUN_ID


@pytest.mark.slow  # submitit's job runner in a process of its own, running a search
def test_a_job_queued_before_the_move_runs_to_its_ticket(tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    shutil.copy(FIXTURE, folder / "7_submitted.pkl")
    env = {**os.environ, "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "7",
           "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
           "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "0",
           "SUBMITIT_LOCAL_LOCALID": "0"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "submitit.core._submit", str(folder)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    outcome, result = pickle.loads((folder / "7_0_result.pkl").read_bytes())
    assert (outcome, result) == ("success", {"status": "finished", "error": ""})
    assert (tmp_path / "runs" / OLD_RUN_ID / "ticket.slt").is_file()
