"""Where a run's ranks go: one machine, a hostfile, or a SLURM allocation.

The parsing functions are pure (no SLURM, no network) and unit-tested; ``check_hosts`` is the one place
that touches the network, so a bad host fails on the login node with one clear line, before training.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Mapping

DEFAULT_MASTER_PORT = 29500


class ClusterError(RuntimeError):
    """A cluster the run cannot use (bad hostfile, unknown host, slots that do not match GPUs)."""

    user_error = True


@dataclass(frozen=True)
class Host:
    """One machine and how many ranks (GPUs, or CPU processes) it runs."""

    name: str
    slots: int


@dataclass
class Cluster:
    """The resolved placement of ranks: hosts in rank order, rendezvous address and port."""

    hosts: list[Host]
    source: str  # "local", "hostfile" or "slurm"
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    hostfile: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return sum(h.slots for h in self.hosts)

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)


# --------------------------------------------------------------------------- nodelists


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1-2],b3`` -> ``["a[1-2]", "b3"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ClusterError(f"nodelist {text!r}: ']' without '[' at character {i}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ClusterError(f"nodelist {text!r}: unclosed '['")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range(body: str, whole: str) -> list[str]:
    """``01-03,7`` -> ``["01", "02", "03", "7"]``, keeping zero padding as SLURM does."""
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ClusterError(f"nodelist {whole!r}: cannot read range {item!r} (expected N or N-M)")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ClusterError(f"nodelist {whole!r}: range {item!r} runs backwards")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM nodelist (``n[1-3,7]``, ``gpu-a[01-04]``, ``a[1-2],b3``, ``r[1-2]n[1-2]``) in order."""
    hosts: list[str] = []
    for group in _split_top_level(nodelist.strip()):
        names = [""]
        for literal, bracket in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", group):
            if not literal and not bracket:
                continue
            suffixes = _expand_range(bracket, nodelist) if bracket else [""]
            names = [n + literal + s for n in names for s in suffixes]
        hosts.extend(names)
    if not hosts:
        raise ClusterError(f"nodelist {nodelist!r} names no hosts")
    return hosts


# --------------------------------------------------------------------------- hostfiles


def parse_hostfile(text: str, source: str = "hostfile") -> list[Host]:
    """Read DeepSpeed's hostfile format (``host slots=N`` per line, ``#`` comments); errors name the line."""
    hosts: list[Host] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not m:
            raise ClusterError(f"{source}:{lineno}: cannot read {raw.strip()!r}; expected 'HOST slots=N'")
        name, slots = m.group(1), int(m.group(2))
        if slots < 1:
            raise ClusterError(f"{source}:{lineno}: {name} has slots={slots}; slots must be >= 1")
        if name in seen:
            raise ClusterError(f"{source}:{lineno}: host {name} is listed twice; list each host once")
        seen.add(name)
        hosts.append(Host(name, slots))
    if not hosts:
        raise ClusterError(f"{source}: no hosts listed; write one 'HOST slots=N' line per machine")
    return hosts


def build_hostfile(hosts: list[Host]) -> str:
    """The hostfile text DeepSpeed's launcher reads, one ``host slots=N`` line per host."""
    return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)


# --------------------------------------------------------------------------- SLURM variables


def _first_int(value: str | None) -> int | None:
    """SLURM writes per-node counts as ``4``, ``4(x2)`` or ``gpu:4``; take the first number."""
    if not value:
        return None
    m = re.search(r"(\d+)", value.split(",")[0].split(":")[-1])
    return int(m.group(1)) if m else None


def slurm_hosts(env: Mapping[str, str]) -> list[Host]:
    """Hosts of the current SLURM allocation, with ranks per node from the tasks (or GPUs) per node."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ClusterError("not inside a SLURM allocation (SLURM_JOB_NODELIST is not set)")
    names = expand_nodelist(nodelist)
    per_node = (_first_int(env.get("SLURM_NTASKS_PER_NODE")) or _first_int(env.get("SLURM_GPUS_PER_NODE"))
                or _first_int(env.get("SLURM_GPUS_ON_NODE")))
    if per_node is None and env.get("SLURM_NTASKS"):
        per_node = max(1, int(env["SLURM_NTASKS"]) // len(names))
    return [Host(n, per_node or 1) for n in names]


def slurm_rank_env(env: Mapping[str, str], master_port: int = DEFAULT_MASTER_PORT) -> dict[str, str]:
    """torch.distributed variables for one SLURM task (one task per GPU): rank from SLURM_PROCID etc."""
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID") if k not in env]
    if missing:
        raise ClusterError(f"not inside an srun task: {', '.join(missing)} not set")
    hosts = slurm_hosts(env)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "LOCAL_SIZE": str(hosts[0].slots),
        "MASTER_ADDR": env.get("MASTER_ADDR") or hosts[0].name,
        "MASTER_PORT": env.get("MASTER_PORT") or str(master_port),
    }


# --------------------------------------------------------------------------- discovery and checks


def local_gpu_count() -> int:
    """GPUs torch sees on this machine (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def discover(hostfile: str | None = None, num_gpus: int | None = None,
             env: Mapping[str, str] | None = None, master_port: int = DEFAULT_MASTER_PORT,
             master_addr: str | None = None) -> Cluster:
    """Pick the cluster: an explicit hostfile, else a SLURM allocation, else this machine.

    ``master_addr`` (``--master-addr``) overrides the rendezvous address of a hostfile cluster.
    """
    env = os.environ if env is None else env
    if master_addr and not hostfile:
        raise ClusterError("--master-addr applies to --hostfile launches (one machine rendezvouses on "
                           "127.0.0.1; under SLURM set MASTER_ADDR in the job instead)")
    if hostfile:
        try:
            text = open(hostfile, encoding="utf-8").read()
        except OSError as exc:
            raise ClusterError(f"hostfile {hostfile}: cannot read it ({exc.strerror})") from None
        hosts = parse_hostfile(text, source=hostfile)
        return Cluster(hosts, "hostfile", master_addr=rendezvous_addr(hosts, master_addr, source=hostfile),
                       master_port=master_port, hostfile=hostfile)
    if env.get("SLURM_JOB_NODELIST") and num_gpus is None:
        hosts = slurm_hosts(env)
        return Cluster(hosts, "slurm", master_addr=hosts[0].name, master_port=master_port)
    gpus = local_gpu_count()
    if num_gpus is None:
        if gpus == 0:
            raise ClusterError("no GPU found on this machine: pass --num-gpus N to run N ranks on CPU, "
                               "or --hostfile FILE")
        num_gpus = gpus
    if num_gpus < 1:
        raise ClusterError(f"--num-gpus {num_gpus}: must be >= 1")
    if gpus and num_gpus > gpus:
        raise ClusterError(f"--num-gpus {num_gpus} but this machine has {gpus} GPU(s)")
    return Cluster([Host("localhost", num_gpus)], "local", master_port=master_port)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def rendezvous_addr(hosts: list[Host], master_addr: str | None = None, source: str = "hostfile") -> str:
    """The address every rank rendezvouses at: rank 0's host (the first), as the other hosts reach it.

    One host: loopback when it is this machine. Several hosts: the first host's name as the hostfile
    spells it (the name the other hosts resolve), never loopback, even when the launch starts on that
    host: a remote rank given 127.0.0.1 would rendezvous with itself and hang. A first host written as
    ``localhost`` is this machine, so its hostname stands in. ``master_addr`` (``--master-addr``) wins.
    """
    first = hosts[0].name
    if len(hosts) == 1:
        return master_addr or ("127.0.0.1" if is_local_host(first) else first)
    chosen = master_addr or (socket.gethostname() if _is_loopback(first) else first)
    if _is_loopback(chosen):
        what = f"--master-addr {chosen}" if master_addr else f"{source}: the first host, {first},"
        raise ClusterError(f"{what} is a loopback address, but {len(hosts)} hosts take part and the others "
                           f"cannot reach it; name the first host as the other hosts resolve it, or pass "
                           f"--master-addr with an address of it they can reach")
    return chosen


def _is_loopback(name: str) -> bool:
    return name in LOOPBACK_NAMES or name.startswith("127.")


def is_local_host(name: str) -> bool:
    """True for this machine's own names and loopback addresses."""
    if name in ("localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        return all(info[4][0].startswith("127.") or info[4][0] == "::1"
                   for info in socket.getaddrinfo(name, None))
    except OSError:
        return False


def check_hosts(cluster: Cluster, ssh_timeout_s: int = 5,
                resolve: Callable = socket.getaddrinfo, run: Callable = subprocess.run) -> None:
    """Every host resolves, remote ones answer ssh, and slots match GPUs; one ClusterError otherwise."""
    problems = []
    for host in cluster.hosts:
        try:
            resolve(host.name, None)
        except OSError as exc:
            problems.append(f"host {host.name} does not resolve ({exc}); fix the name or /etc/hosts")
            continue
        if is_local_host(host.name):
            gpus = local_gpu_count()
            if gpus and host.slots > gpus:
                problems.append(f"host {host.name}: slots={host.slots} but it has {gpus} GPU(s)")
            continue
        problems.extend(_check_remote(host, ssh_timeout_s, run))
    if problems:
        where = f" in {cluster.hostfile}" if cluster.hostfile else ""
        raise ClusterError(f"cluster check failed{where}: " + "; ".join(problems))


def _check_remote(host: Host, ssh_timeout_s: int, run: Callable) -> list[str]:
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={ssh_timeout_s}", host.name,
           "nvidia-smi -L 2>/dev/null | wc -l"]
    try:
        res = run(cmd, capture_output=True, text=True, timeout=ssh_timeout_s + 5)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"host {host.name} does not answer ssh within {ssh_timeout_s}s ({exc})"]
    if res.returncode != 0:
        err = (res.stderr or "").strip().splitlines()
        return [f"host {host.name} does not answer ssh (exit {res.returncode}: {err[-1] if err else 'no output'}); "
                f"passwordless ssh from this machine is required"]
    gpus = _first_int(res.stdout.strip()) or 0
    if gpus and host.slots != gpus:
        return [f"host {host.name}: slots={host.slots} but it has {gpus} GPU(s)"]
    return []
