"""A real two-node SLURM cluster on one machine, for the `slurm` tests.

munge, one slurmctld and two slurmd daemons posing as nodes n1 and n2 (one CPU each is enough for one
rank per node). All SLURM state lives in a temporary folder; the config is found through SLURM_CONF, so
nothing under /etc/slurm is written. Daemons we start are stopped by their pid files at the end.
Needs root and the Debian packages slurm-wlm and munge (.ci/run installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

NODES = ("n1", "n2")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_PID = Path("/run/munge/munged.pid")


@dataclass
class SlurmCluster:
    """A running cluster: its config file and the environment that points clients at it."""

    root: Path
    conf: Path
    env: dict

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        res = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr}{res.stdout}")
        return res

    def job_state(self, job_id: str) -> dict:
        """`scontrol show job` as a dict of its KEY=VALUE fields ({} once the job is forgotten)."""
        res = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if res.returncode != 0:
            return {}
        return dict(item.split("=", 1) for item in res.stdout.split() if "=" in item)

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout_s: float) -> dict:
        """Poll until the job reaches one of ``states``; fail with its last state and log otherwise."""
        deadline = time.monotonic() + timeout_s
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job_state(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id} did not reach {states} in {timeout_s}s; last: "
                             f"{info.get('JobState')} {info.get('Reason')}")


def _root_conftest():
    """tests/conftest.py by path (the name `conftest` is ambiguous inside tests/e2e)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("zerotune_root_conftest", Path(__file__).parent.parent / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_losses(run_dir: Path) -> dict[int, list[float]]:
    """Every logged training loss in ``run_dir/metrics.jsonl`` per step (a step logged twice appears twice)."""
    import json

    out: dict[int, list[float]] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("kind") == "train" and "train/loss" in rec:
                out.setdefault(int(rec["step"]), []).append(rec["train/loss"])
    return out


def slurm_installed() -> bool:
    """True where the daemons and clients are installed."""
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_ok() -> bool:
    enc = subprocess.run(["munge", "-n"], capture_output=True)
    if enc.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=enc.stdout, capture_output=True).returncode == 0


def _start_munge() -> bool:
    """Start munged if it is not already answering; returns True when we started it."""
    if _munge_ok():
        return False
    if not MUNGE_KEY.is_file():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
    for d in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    for _ in range(50):
        if _munge_ok():
            return True
        time.sleep(0.1)
    raise RuntimeError("munged started but `munge -n | unmunge` fails")


def _ensure_hosts() -> None:
    """The node names (ranks rendezvous at n1) and this host's name (slurmctld's address) must resolve."""
    hosts = Path("/etc/hosts")
    text = hosts.read_text()
    names = list(NODES)
    try:
        socket.gethostbyname(socket.gethostname())
    except OSError:
        names.append(socket.gethostname())
    missing = [n for n in names if not any(n in line.split()[1:] for line in text.splitlines()
                                           if line.strip() and not line.startswith("#"))]
    if missing:
        hosts.write_text(text.rstrip("\n") + f"\n127.0.0.1 {' '.join(missing)}\n")


def write_conf(root: Path, host: str, ctld_port: int, node_ports: tuple[int, int]) -> Path:
    """slurm.conf for two nodes on this host, all state under ``root``."""
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lo, hi = node_ports
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=zerotune-ci
SlurmctldHost={host}
SlurmctldPort={ctld_port}
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldLogFile={root}/log/ctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldPidFile={root}/ctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=10
MinJobAge=600
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port={lo}-{hi} CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def start_cluster(root: Path) -> tuple[SlurmCluster, bool]:
    """Start munge (if needed), slurmctld and two slurmd; wait until both nodes are idle."""
    started_munge = _start_munge()
    _ensure_hosts()
    ctld_port, p1 = _free_port(), _free_port()
    p1 = max(p1, 20000) if p1 < 65000 else 20000
    conf = write_conf(root, socket.gethostname(), ctld_port, (p1, p1 + 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld"], env=env, check=True)
    for node in NODES:
        subprocess.run(["slurmd", "-N", node], env=env, check=True)
    cluster = SlurmCluster(root, conf, env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        res = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
        if res.returncode == 0 and all(states.get(n) == "idle" for n in NODES):
            return cluster, started_munge
        time.sleep(0.5)
    stop_cluster(root, started_munge)
    log = (root / "log" / "ctld.log").read_text() if (root / "log" / "ctld.log").exists() else ""
    raise RuntimeError(f"SLURM nodes did not become idle: {res.stdout}{res.stderr}\n{log[-2000:]}")


def _kill_pidfile(path: Path) -> None:
    if not path.is_file():
        return
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, signal.SIGTERM)
    except (ValueError, ProcessLookupError):
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_cluster(root: Path, started_munge: bool) -> None:
    """Stop the daemons we started, by their pid files."""
    for node in NODES:
        _kill_pidfile(root / f"slurmd-{node}.pid")
    _kill_pidfile(root / "ctld.pid")
    if started_munge:
        _kill_pidfile(MUNGE_PID)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running two-node cluster (n1, n2) for the session; fails in CI when SLURM is not installed."""
    require = _root_conftest().require
    require(slurm_installed(), "SLURM (apt packages slurm-wlm and munge)")
    require(os.geteuid() == 0, "root (to start munged and slurmd)")
    root = tmp_path_factory.mktemp("slurm")
    cluster, started_munge = start_cluster(root)
    try:
        yield cluster
    finally:
        stop_cluster(root, started_munge)
