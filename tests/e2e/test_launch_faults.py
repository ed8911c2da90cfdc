"""`zerotune launch --hostfile` with two local ranks: a rank killed with SIGKILL ends the whole job with a
failure exit code, leaves no process behind, and the next launch resumes from the last complete checkpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from slurm_cluster import train_losses

pytestmark = pytest.mark.dist
MAX_STEPS = 10
# deepspeed.timeout_minutes bounds how long survivors may wait in a collective; the launcher reaps them
# as soon as it sees one rank die, so the job must end well within this.
END_WITHIN_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_yaml: Path, hostfile: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launcher.cli", "launch", str(run_yaml), "--hostfile", str(hostfile),
           "--master-port", str(_free_port())]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    out = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if any(a.endswith("train.py") for a in cmd) and any(a.startswith("--local_rank") for a in cmd):
            out.append(child)
    return out


def _processes_using(path: Path) -> list[int]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(str(path) in (a or "") for a in (p.info["cmdline"] or [])):
            found.append(p.info["pid"])
    return found


def _complete_checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())


def _wait_for_step(proc, run_dir: Path, step: int, log: Path) -> None:
    """Until ``run_dir`` has logged ``step``; the launch must still be running."""
    deadline = time.monotonic() + 300
    while max(train_losses(run_dir), default=0) < step:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the run never reached step {step}"
        time.sleep(0.3)


def test_killed_rank_fails_the_job_and_the_next_launch_resumes(write_run, tmp_path):
    run_yaml = write_run(tmp_path, train={"max_steps": MAX_STEPS}, deepspeed={"config": "zero3.json",
                                                                               "timeout_minutes": 1})
    run_dir = run_yaml.parent / "out"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    proc = _launch(run_yaml, hostfile, tmp_path / "first.log")
    try:
        _wait_for_step(proc, run_dir, 5, tmp_path / "first.log")
        ranks = _ranks(proc)
        assert len(ranks) == 2, [r.cmdline() for r in ranks]
        ranks[1].send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=END_WITHIN_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc != 0, "a killed rank must fail the job"
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, f"ranks left behind: {[p.pid for p in alive]}"
    assert _processes_using(run_dir / "config.yaml") == []
    killed_at = max(train_losses(run_dir))
    assert killed_at < MAX_STEPS
    last_complete = (run_dir / "checkpoints" / "latest").read_text().strip()

    proc = _launch(run_yaml, hostfile, tmp_path / "second.log")
    try:
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "second.log").read_text()
    assert rc == 0, log[-3000:]
    assert f"resumed from {last_complete}" in log
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert f"step-{MAX_STEPS:08d}" in _complete_checkpoints(run_dir)


def test_sigusr1_to_launch_checkpoints_and_exits_85(write_run, tmp_path):
    """A scheduler's warning sent to `zerotune launch` reaches the ranks: they save and the job exits 85."""
    run_yaml = write_run(tmp_path, train={"max_steps": 40}, checkpoint={"every_steps": 100, "keep_last": 2,
                                                                        "keep_best": False})
    run_dir = run_yaml.parent / "out"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    proc = _launch(run_yaml, hostfile, tmp_path / "launch.log")
    try:
        _wait_for_step(proc, run_dir, 3, tmp_path / "launch.log")
        ranks = _ranks(proc)
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=END_WITHIN_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "launch.log").read_text()
    assert rc == 85, log[-3000:]
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive
    stopped_at = max(train_losses(run_dir))
    # No periodic checkpoint is due before step 100: the one on disk is the preemption's.
    assert _complete_checkpoints(run_dir) == [f"step-{stopped_at:08d}"]
    assert f"preempted at step {stopped_at}" in log
