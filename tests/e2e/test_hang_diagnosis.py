"""Diagnosing a hang on 2 gloo ranks: a rank made to sleep inside a step is named by `zerotune status` as
the one behind, and the other rank's stack dump (SIGUSR2) shows it waiting in the step's collective."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from test_train_dist import REPO_ROOT, check, deepspeed_bin, launch, prepared, run_config  # noqa: F401 - fixtures
from training import remove_allreduce_buffers
from training.heartbeat import FAULT_SLEEP_ENV, read_heartbeats, stacks_path

pytestmark = pytest.mark.dist
SLEEP_AT_STEP, SLEEP_S = 3, 30


def _status(run_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", "status", str(run_dir)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def _wait_until_stuck(proc, run_dir, deadline_s: float = 300) -> dict:
    """Until rank 1 has slept in step SLEEP_AT_STEP's forward for over 12 s; the heartbeats by rank."""
    deadline = time.monotonic() + deadline_s
    while True:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "rank 1 never reached the step it sleeps in"
        beats = {b["rank"]: b for b in read_heartbeats(run_dir)}
        sleeper = beats.get(1, {})
        if sleeper.get("step") == SLEEP_AT_STEP and sleeper.get("phase") == "forward" and \
                time.time() - sleeper["time"] > 12:
            return beats
        time.sleep(0.5)


def test_sleeping_rank_is_named_behind_and_the_other_waits_in_a_collective(deepspeed_bin, tiny_model_dir,
                                                                             prepared, tmp_path):
    run_dir = tmp_path / "run"
    # ZeRO-2: the forward has no collective, so the rank that is not asleep runs on into the backward's
    # gradient reduction and waits there.
    cfg = run_config(tiny_model_dir, prepared, run_dir, stage=2, train={"max_steps": 5},
                     eval={"every_steps": None, "sample_generations": 0}, checkpoint={"every_steps": None})
    proc = launch(deepspeed_bin, cfg, wait=False, **{FAULT_SLEEP_ENV: f"1:{SLEEP_AT_STEP}:{SLEEP_S}"})
    try:
        beats = _wait_until_stuck(proc, run_dir)
        res = _status(run_dir)
        assert res.returncode == 1, res.stdout + res.stderr
        behind = [line for line in res.stdout.splitlines() if line.startswith("behind:")]
        assert len(behind) == 1 and behind[0].startswith(
            f"behind: rank 1 on {beats[1]['host']} (pid {beats[1]['pid']}) has been in step {SLEEP_AT_STEP} forward"), \
            res.stdout
        for rank in (0, 1):
            os.kill(beats[rank]["pid"], signal.SIGUSR2)
        time.sleep(2)
        waiting, sleeping = (stacks_path(run_dir, r).read_text() for r in (0, 1))
        # Rank 0 is in the gradient all-reduce of the engine's backward, called from the driver's step: it
        # waits there for rank 1.
        assert "in all_reduce" in waiting and "in backward" in waiting and "in _train_step" in waiting, waiting
        assert "in beat" in sleeping and "heartbeat.py" in sleeping, sleeping
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        remove_allreduce_buffers(proc.master_port)
    assert proc.returncode == 0, out[-3000:]
    res = _status(run_dir)  # finished: every rank's last heartbeat is "exit", nothing flagged
    assert res.returncode == 0 and res.stdout.count(" exit ") == 2, res.stdout
