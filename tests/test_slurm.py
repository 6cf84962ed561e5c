"""Sweeps on a real single-node SLURM cluster (scripts/slurm-local.sh), through submitit.

The session fixture starts the cluster (installing slurm, munge and MariaDB with apt when missing)
and stops it afterwards unless it was already running. Skipped only where the script cannot run:
without root or without apt-get.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_cfg

from modnets.train import run

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]  # one worker owns the cluster
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm-local.sh"
TINY = ["experiment=modular", "trainer.epochs=2", "logger.mode=disabled", "trainer.progress=false", "trainer.threads=1"]
# long enough (1000 epochs of about 10 ms each) to be interrupted after its first checkpoint: scancel lets a job
# run KillWait (2 s here) after SIGTERM, which submitit ignores, so a shorter run could finish first
LONG = ["experiment=modular", "seed=3", "trainer.epochs=1000", "logger.mode=disabled", "trainer.threads=1"]
SLURM = ["hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=1"]


@pytest.fixture(scope="session")
def cluster():
    """Environment for commands that talk to the local cluster."""
    if os.geteuid() != 0:
        pytest.skip("slurm tests need root: scripts/slurm-local.sh installs and starts a local SLURM cluster")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("slurm tests need apt-get (Debian/Ubuntu) to install slurm, munge and MariaDB")
    env = {**os.environ, "SLURM_CONF": os.environ.get("SLURM_LOCAL_DIR", "/tmp/modnets-slurm") + "/etc/slurm.conf"}
    was_up = subprocess.run(["bash", SCRIPT, "status"], capture_output=True, env=env).returncode == 0
    up = subprocess.run(["bash", SCRIPT, "up"], capture_output=True, text=True, env=env, timeout=900)
    assert up.returncode == 0, up.stdout + up.stderr
    yield env | {"WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    if not was_up:
        subprocess.run(["bash", SCRIPT, "down"], capture_output=True, env=env, timeout=120)


def sweep(env, *args, wait=True):
    command = [sys.executable, "-m", "modnets.train", "-m", *args]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def results(folder: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(folder)): json.loads(p.read_text()) for p in folder.rglob("results.json")}


def submitted(folder: Path) -> list[str]:
    """SLURM job ids of the sweep: submitit's folders with a log (JOB, or ARRAY_TASK in a job array)."""
    return sorted(p.parent.name for p in (folder / ".submitit").glob("*/*_log.out"))


def wait_for(condition, timeout=120, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def job_log(folder: Path, job: str) -> str:
    return "".join(p.read_text() for p in (folder / ".submitit" / job).glob("*_log.*"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The LONG run trained in one go, here in the test process."""
    return run(make_cfg(*LONG, output_dir=str(tmp_path_factory.mktemp("reference"))))[0]


def test_a_sweep_through_submitit_slurm_completes_and_a_relaunch_submits_nothing(cluster, tmp_path):
    args = ["hydra/launcher=submitit_slurm", *SLURM, "seed=1,2,3", *TINY, f"hydra.sweep.dir={tmp_path}"]
    proc = sweep(cluster, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = results(tmp_path)
    assert sorted(found) == ["0", "1", "2"] and all(r["status"] == "completed" for r in found.values())
    assert [found[k]["config"]["seed"] for k in "012"] == [1, 2, 3]
    jobs = submitted(tmp_path)
    assert len(jobs) == 3 and len({j.split("_")[0] for j in jobs}) == 1  # one job array
    before = {p: p.read_bytes() for p in tmp_path.rglob("results.json")}
    again = sweep(cluster, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "modnets: 3 of 3 jobs already finished" in again.stdout
    assert submitted(tmp_path) == jobs  # nothing went to the queue
    assert {p: p.read_bytes() for p in tmp_path.rglob("results.json")} == before


def test_a_job_cancelled_after_its_checkpoint_resumes_when_relaunched_and_matches_an_uninterrupted_run(
    cluster, tmp_path, uninterrupted
):
    args = ["hydra/launcher=submitit_slurm", *SLURM, *LONG, "trainer.checkpoint_every=5", f"hydra.sweep.dir={tmp_path}"]
    proc = sweep(cluster, *args, wait=False)
    try:
        wait_for(lambda: (tmp_path / "0" / "checkpoint.pt").exists(), what="the first checkpoint")
        (job,) = submitted(tmp_path)
        subprocess.run(["scancel", job], env=cluster, check=True)
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode != 0 and not (tmp_path / "0" / "results.json").exists(), out[-3000:]
    again = sweep(cluster, *args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = [j for j in submitted(tmp_path) if j != job]
    assert len(resumed) == 1 and "modnets: resuming from" in job_log(tmp_path, resumed[0])
    result = results(tmp_path)["0"]
    assert result["status"] == "completed" and not (tmp_path / "0" / "checkpoint.pt").exists()
    assert result["history"] == uninterrupted["history"] and result["config_hash"] == uninterrupted["config_hash"]


def test_a_job_signalled_at_its_time_limit_checkpoints_requeues_itself_and_matches_an_uninterrupted_run(
    cluster, tmp_path, uninterrupted
):
    # hydra/launcher=slurm allows requeues after a timeout; checkpoint_every=0: the only checkpoint is the one
    # written when the signal arrives. USR2 is what SLURM sends signal_delay_s before the time limit.
    args = ["hydra/launcher=slurm", *SLURM, *LONG, "trainer.checkpoint_every=0", f"hydra.sweep.dir={tmp_path}"]
    proc = sweep(cluster, *args, wait=False)
    try:
        wait_for(lambda: submitted(tmp_path), what="the job to be submitted")
        (job,) = submitted(tmp_path)
        wait_for(lambda: "epoch   100/1000" in job_log(tmp_path, job), what="epoch 100 of the job")
        subprocess.run(["scancel", "--signal=USR2", job], env=cluster, check=True)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    log = job_log(tmp_path, job)
    assert "written on the requeue signal" in log and "modnets: resuming from" in log, log[-3000:]
    epoch = int(log.split("resuming from")[1].split("after epoch ")[1].split()[0])
    assert 100 <= epoch < 1000
    result = results(tmp_path)["0"]
    assert result["status"] == "completed" and not (tmp_path / "0" / "checkpoint.pt").exists()
    assert result["history"] == uninterrupted["history"]
