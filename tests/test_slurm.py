"""configs/slurm/rho-train.sbatch with stand-ins for srun, scontrol and python (no cluster): a first
start has no --resume, a start that finds RUN/latest resumes, exit 12 requeues the job and any other
exit code ends it with that code."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "configs" / "slurm" / "rho-train.sbatch"


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture()
def cluster(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    # srun: drop its own options, run the command as task 0 of 2 on this node
    _stub(bin_dir, "srun", f'while [[ "$1" == --* ]]; do shift; done\n'
                           f'echo "srun $*" >> {log}\nSLURM_PROCID=0 SLURM_NTASKS=2 SLURM_LOCALID=0 "$@"\n')
    _stub(bin_dir, "scontrol", f'echo "scontrol $*" >> {log}\n[ "$1" = show ] && echo node1\nexit 0\n')
    _stub(bin_dir, "python", f'echo "python RANK=$RANK WORLD_SIZE=$WORLD_SIZE LOCAL_RANK=$LOCAL_RANK '
                             f'MASTER_ADDR=$MASTER_ADDR $*" >> {log}\nexit ${{FAKE_RHO_EXIT:-0}}\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node[1-2]",
               SLURM_NNODES="2")
    return tmp_path, env, log


def _sbatch(cluster, rc: int, *args: str) -> tuple[int, list[str]]:
    tmp_path, env, log = cluster
    proc = subprocess.run(["bash", str(SCRIPT), "cfg.yaml", "--tp", "2", "--save", str(tmp_path / "run"), *args],
                          env=dict(env, FAKE_RHO_EXIT=str(rc)), capture_output=True, text=True, timeout=60)
    return proc.returncode, log.read_text().splitlines()


def test_first_start_trains_and_a_finished_run_ends_the_job(cluster):
    rc, calls = _sbatch(cluster, 0)
    rho = [c for c in calls if c.startswith("python")]
    assert rc == 0 and len(rho) == 1
    assert "RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=node1 -m rhocli train cfg.yaml --tp 2 --save" in rho[0]
    assert "--resume" not in rho[0] and not [c for c in calls if "requeue" in c]


def test_preempted_run_is_requeued_and_resumes(cluster):
    tmp_path, _, _ = cluster
    rc, calls = _sbatch(cluster, 12)
    assert rc == 0 and "scontrol requeue 77" in calls
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("step_000300\n")
    rc, calls = _sbatch(cluster, 0)
    assert rc == 0 and calls[-1].endswith("--resume")


@pytest.mark.parametrize("code", [10, 11, 2])
def test_other_failures_end_the_job_with_their_code(cluster, code):
    rc, calls = _sbatch(cluster, code)
    assert rc == code and not [c for c in calls if "requeue" in c]
