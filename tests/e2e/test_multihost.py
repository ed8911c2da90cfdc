"""`zerotune launch --hostfile` across two real hosts over ssh (tests/e2e/multihost.py), started on host a.

One rank per host, ZeRO-3 over gloo on CPU, ranks started by DeepSpeed's pdsh runner: the run equals a
single-host 2-rank run step for step; a killed rank fails the job on both hosts and the next launch
resumes; a signal to the launcher stops both hosts' ranks after a checkpoint; an unreachable host is one
error before any rank starts.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import multihost
from slurm_cluster import _root_conftest, train_losses

pytestmark = pytest.mark.multihost
REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 6
LAUNCH_TIMEOUT_S = 420  # generous: other jobs may share the cores
TIMEOUT_MINUTES = 1  # deepspeed.timeout_minutes: the longest a survivor may wait in a collective
END_MARGIN_S = 60


@pytest.fixture(scope="session")
def hosts(tmp_path_factory):
    missing = multihost.missing_tools()
    _root_conftest().require(not missing, f"two ssh hosts in network namespaces ({', '.join(missing)})")
    pair = multihost.setup(tmp_path_factory.mktemp("hosts"))
    try:
        yield pair
    finally:
        multihost.teardown(pair)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


def _launch(hosts, run_yaml: Path, log: Path, *extra: str, on_host_a: bool = True, **env) -> subprocess.Popen:
    """`zerotune launch` on host a with a hostfile of both hosts (or, ``on_host_a=False``, 2 local ranks)."""
    cmd = [sys.executable, "-m", "launcher.cli", "launch", str(run_yaml), "--master-port", str(_free_port()), *extra]
    if on_host_a:
        hostfile = run_yaml.parent / "hostfile"
        hostfile.write_text("".join(f"{name} slots=1\n" for name in hosts.names))
        cmd = hosts.on_host_a([*cmd, "--hostfile", str(hostfile)])
    else:
        cmd += ["--num-gpus", "2"]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env={**_env(), **env}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, run_dir: Path, timeout: float = LAUNCH_TIMEOUT_S) -> int:
    """The launch's exit code; on a timeout, or when ranks outlive it, kill them and fail."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        multihost.kill_all(multihost.processes_using(str(run_dir)))
        raise AssertionError(f"the launch did not end within {timeout:.0f}s")
    left = _wait_gone(run_dir, 10)
    multihost.kill_all(left)
    assert not left, f"processes left behind for {run_dir}: {left}"
    return rc


def _wait_gone(run_dir: Path, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := multihost.processes_using(str(run_dir))) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _wait_for_step(proc, run_dir: Path, step: int, log: Path) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while max(train_losses(run_dir), default=0) < step:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the run never reached step {step}"
        time.sleep(0.3)


def _rank_pid(run_dir: Path, host: str) -> int:
    """pid of the training rank whose heartbeat says it runs on ``host``."""
    import json

    for path in (run_dir / "heartbeats").glob("rank-*.json"):
        beat = json.loads(path.read_text())
        if beat["host"] == host:
            return beat["pid"]
    raise AssertionError(f"no rank heartbeat from {host} in {run_dir / 'heartbeats'}")


def _run_yaml(write_run, folder: Path, **sections) -> Path:
    sections.setdefault("train", {}).setdefault("max_steps", MAX_STEPS)
    sections.setdefault("deepspeed", {}).update(config="zero3.json", timeout_minutes=TIMEOUT_MINUTES)
    return write_run(folder, **sections)


def test_two_hosts_train_like_one_host_with_two_ranks(hosts, write_run, tmp_path):
    """Per-step ZeRO-3 losses across two hosts equal one host's 2-rank run (2 ranks: the same sums, so the
    same floats; 1e-6 only allows for the JSON round trip). The preflight reports both hosts."""
    runs = {}
    for where in ("one-host", "two-hosts"):
        run_yaml = _run_yaml(write_run, tmp_path / where)
        log = tmp_path / f"{where}.log"
        proc = _launch(hosts, run_yaml, log, on_host_a=where == "two-hosts")
        rc = _finish(proc, run_yaml.parent / "out")
        assert rc == 0, log.read_text()[-4000:]
        runs[where] = {step: values[-1] for step, values in train_losses(run_yaml.parent / "out").items()}
    text = (tmp_path / "two-hosts.log").read_text()
    assert "rendezvous zt-hosta:" in text
    assert "preflight: 2 ranks on 2 host(s) joined (gloo, rendezvous zt-hosta:" in text
    assert "rank    1  zt-hostb                 binds 198.18.0.2 (zt0)" in text
    assert sorted(runs["two-hosts"]) == list(range(1, MAX_STEPS + 1))
    diff = max(abs(runs["two-hosts"][s] - runs["one-host"][s]) for s in runs["one-host"])
    assert diff <= 1e-6, (runs, diff)


def test_killed_rank_on_host_b_fails_both_hosts_and_the_next_launch_resumes(hosts, write_run, tmp_path):
    run_yaml = _run_yaml(write_run, tmp_path, train={"max_steps": 12})
    run_dir = run_yaml.parent / "out"
    log = tmp_path / "first.log"
    proc = _launch(hosts, run_yaml, log)
    _wait_for_step(proc, run_dir, 4, log)
    os.kill(_rank_pid(run_dir, "zt-hostb"), signal.SIGKILL)
    rc = _finish(proc, run_dir, timeout=TIMEOUT_MINUTES * 60 + END_MARGIN_S)
    assert rc != 0, "a killed rank must fail the job"
    last_complete = (run_dir / "checkpoints" / "latest").read_text().strip()

    log = tmp_path / "second.log"
    rc = _finish(_launch(hosts, run_yaml, log), run_dir)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert f"resumed from {last_complete}" in text
    assert sorted(train_losses(run_dir)) == list(range(1, 13))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_the_launcher_stops_both_hosts_after_a_checkpoint(hosts, write_run, tmp_path, signum):
    from training.preemption import PREEMPTED_EXIT_CODE

    run_yaml = _run_yaml(write_run, tmp_path, train={"max_steps": 400}, checkpoint={"every_steps": 1000})
    run_dir = run_yaml.parent / "out"
    log = tmp_path / "launch.log"
    proc = _launch(hosts, run_yaml, log)
    _wait_for_step(proc, run_dir, 2, log)
    proc.send_signal(signum)
    rc = _finish(proc, run_dir, timeout=TIMEOUT_MINUTES * 60 + END_MARGIN_S)
    text = log.read_text()
    assert rc == PREEMPTED_EXIT_CODE, text[-4000:]
    stopped_at = max(train_losses(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at:08d}"
    assert f"preempted at step {stopped_at}" in text


def test_unreachable_host_is_one_error_before_any_rank_starts(hosts, write_run, tmp_path):
    run_yaml = _run_yaml(write_run, tmp_path)
    log = tmp_path / "launch.log"
    hosts.stop_sshd("b")
    try:
        started = time.monotonic()
        rc = _finish(_launch(hosts, run_yaml, log), run_yaml.parent / "out", timeout=30)
        elapsed = time.monotonic() - started
    finally:
        hosts.start_sshd("b")
    text = log.read_text()
    assert rc == 2, text
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "zt-hostb does not answer ssh" in errors[0], text
    assert "Connection refused" in errors[0], text
    assert "Traceback" not in text
    assert elapsed < 30
    assert not (run_yaml.parent / "out" / "metrics.jsonl").exists()


def test_ranks_binding_an_interface_the_other_host_cannot_reach_fail_the_preflight_fast(hosts, write_run, tmp_path):
    """GLOO_SOCKET_IFNAME=lo in the launching shell reaches host b through .deepspeed_env; each rank then
    offers the other a loopback address. Both ranks' preflights fail, and whichever fails first (a race
    between the hosts: either may see its connection refused first) names its own rank, its host and the
    variable in well under a minute; the launcher then stops the job on both hosts (not after the
    30-minute timeout)."""
    from training.preflight import PREFLIGHT_TIMEOUT_S

    run_yaml = _run_yaml(write_run, tmp_path, deepspeed={"timeout_minutes": 30})
    log = tmp_path / "launch.log"
    proc = _launch(hosts, run_yaml, log, GLOO_SOCKET_IFNAME="lo")
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while "error: preflight: rank " not in log.read_text() and proc.poll() is None:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    rc = _finish(proc, run_yaml.parent / "out", timeout=30)  # both hosts' ranks gone within 30 s of the error
    text = log.read_text()
    assert rc != 0, text[-4000:]
    failures = re.findall(r"(zt-host\w): error: preflight: rank (\d) on host (\S+) could not join .* within (\d+)s", text)
    assert failures, text[-4000:]
    host_of_rank = {"0": "zt-hosta", "1": "zt-hostb"}  # one rank per host, in hostfile order
    for printed_by, rank, host, _ in failures:
        assert host == host_of_rank[rank] == printed_by, text[-4000:]
    assert all(int(seconds) <= PREFLIGHT_TIMEOUT_S + 5 for *_, seconds in failures) and PREFLIGHT_TIMEOUT_S < 60
    assert "binds 127.0.0.1 (lo, from GLOO_SOCKET_IFNAME)" in text and "GLOO_SOCKET_IFNAME names an interface" in text
    failed_hosts = {host for _, _, host, _ in failures}
    assert any(f"the ranks on {host} failed; stopping the ranks on every host" in text for host in failed_hosts), text[-4000:]
    assert "step      1/" not in text
