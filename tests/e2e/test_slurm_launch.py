"""`zerotune launch` and `zerotune slurm` against the real two-node cluster (no template involved)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slurm_cluster import train_losses

pytestmark = pytest.mark.slurm


def test_launch_inside_an_allocation_stages_data_and_trains(slurm_cluster, write_run, tmp_path):
    """Inside sbatch, launch finds the nodes from SLURM, sbcasts the shards to each node, verifies them,
    and starts one srun task per node."""
    run_yaml = write_run(tmp_path, train={"max_steps": 2}, checkpoint={"every_steps": 2, "keep_last": 1,
                                                                       "keep_best": False})
    stage = tmp_path / "node-local"
    log = tmp_path / "job.out"
    wrap = f"{sys.executable} -m launcher.cli launch {run_yaml} --stage-data {stage}"
    res = slurm_cluster.run("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--output={log}",
                            f"--chdir={tmp_path}", f"--wrap={wrap}")
    job = res.stdout.strip()
    info = slurm_cluster.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 300)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert "cluster (slurm): n1 x1, n2 x1; 2 ranks, rendezvous n1:" in text
    assert f"data staged to {stage} and verified against the manifest" in text
    assert "srun --nodes=2 --ntasks-per-node=1 --ntasks=2" in text
    assert sorted(train_losses(run_yaml.parent / "out")) == [1, 2]
    assert (stage / "manifest.json").is_file()


def test_slurm_command_refuses_a_job_the_cluster_cannot_run(slurm_cluster, write_run, tmp_path):
    run_yaml = write_run(tmp_path)
    cmd = [sys.executable, "-m", "launcher.cli", "slurm", str(run_yaml), "--nodes", "3", "--gpus-per-node", "1",
           "--time", "00:10:00", "--cpu-only"]
    res = subprocess.run(cmd, env=slurm_cluster.env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "sbatch --test-only" in err[0] and "refused the job" in err[0]
    script = (run_yaml.parent / "out" / "job.sbatch").read_text()
    assert "#SBATCH --nodes=3" in script
    assert not (run_yaml.parent / "out" / "job_id").exists()
