"""Preflight: join the process group with a short timeout and all-reduce once, before any training.

Multi-node start-up failures (a host that cannot resolve the rendezvous host, ranks binding an interface
the others cannot reach, a firewall) otherwise show as a silent wait for the full collective timeout
(30 minutes and more). Here the process group is created with PREFLIGHT_TIMEOUT_S, every rank all-reduces
one number, rank 0 prints which host each rank runs on and the address it binds, and only then is the
group's timeout raised to ``deepspeed.timeout_minutes``. A failure is one PreflightError naming this rank's
host, the rendezvous, the address it binds and what to check.

Cost at scale: one all-reduce of one element and one store key per rank, once per launch (rank 0 reads
N keys: 64 ranks, well under a second).
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from typing import Callable

# Short enough that a broken cluster ends within a minute, long enough for ranks that start a few
# seconds apart (each imports torch and loads its tokenizer before joining).
PREFLIGHT_TIMEOUT_S = 45
_KEY = "zerotune/preflight/{rank}"
_LOOPBACK = " (loopback: ranks on other hosts cannot reach it)"


class PreflightError(RuntimeError):
    """The ranks could not form a process group or all-reduce within PREFLIGHT_TIMEOUT_S.

    Unlike other user errors it is not found alike on every rank, so no rank waits for the others on exit.
    """

    user_error = True


def socket_ifname_var(backend: str) -> str:
    """The variable that picks the interface ranks bind: NCCL_SOCKET_IFNAME for nccl, else GLOO_SOCKET_IFNAME."""
    return "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"


def bound_address(backend: str, env=os.environ) -> str:
    """The address this rank binds for collectives, and its interface: the one named by the
    *_SOCKET_IFNAME variable, else (gloo's and NCCL's default) the address this host's name resolves to."""
    import psutil

    interfaces = {name: [a.address for a in addrs if a.family == socket.AF_INET]
                  for name, addrs in psutil.net_if_addrs().items()}
    var = socket_ifname_var(backend)
    if env.get(var):
        name = env[var].split(",")[0].lstrip("=^")
        addrs = interfaces.get(name)
        return f"{addrs[0]} ({name}, from {var})" if addrs else f"nothing: {var}={env[var]} is no interface here"
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError as exc:
        return f"nothing: this host's name {socket.gethostname()} does not resolve ({exc})"
    name = next((n for n, addrs in interfaces.items() if addr in addrs), "?")
    return f"{addr} ({name})"


def run_preflight(init: Callable[[timedelta], None], backend: str, device: str,
                  training_timeout: timedelta, print_fn: Callable[[str], None] = print) -> None:
    """Create the process group via ``init(timeout)`` with the short timeout, all-reduce once, report
    (rank 0), then set the group's timeout to ``training_timeout``; PreflightError on any failure."""
    import torch
    import torch.distributed as dist

    start = time.monotonic()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    mine = {"rank": rank, "host": socket.gethostname(), "binds": bound_address(backend)}
    try:
        init(timedelta(seconds=PREFLIGHT_TIMEOUT_S))
        ones = torch.ones(1, device=device)
        dist.all_reduce(ones)
        if int(ones.item()) != world:
            raise RuntimeError(f"the all-reduce summed to {int(ones.item())}, not {world}")
        store = dist.distributed_c10d._get_default_store()
        store.set(_KEY.format(rank=rank), json.dumps(mine))
        table = [json.loads(store.get(_KEY.format(rank=r))) for r in range(world)] if rank == 0 else []
    except Exception as exc:  # noqa: BLE001 - any failure to connect is reported the same way, with the fix
        raise PreflightError(failure_message(mine, backend, time.monotonic() - start, exc)) from None
    dist.distributed_c10d._set_pg_timeout(training_timeout)
    if rank == 0:
        print_fn(format_report(table, time.monotonic() - start, backend))


def failure_message(mine: dict, backend: str, elapsed_s: float, exc: BaseException) -> str:
    """One line: who failed, against which rendezvous, and what to check."""
    addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return (f"preflight: rank {mine['rank']} on host {mine['host']} could not join the process group at "
            f"{addr}:{port} and all-reduce within {elapsed_s:.0f}s ({type(exc).__name__}: {cause}). This rank "
            f"binds {mine['binds']}{_LOOPBACK if mine['binds'].startswith('127.') else ''}. Check: that every host resolves {addr} to an address of that host it can "
            f"reach (hostname resolution: /etc/hosts or DNS); that {socket_ifname_var(backend)} names an "
            f"interface that exists on every host and reaches the others (or is unset); that no firewall blocks "
            f"TCP port {port} or the ports between the hosts. Turn this check off with --no-preflight.")


def format_report(table: list[dict], elapsed_s: float, backend: str) -> str:
    """Rank 0's report: ranks, hosts and bound addresses, and how long joining took."""
    hosts = sorted({row["host"] for row in table})
    lines = [f"preflight: {len(table)} ranks on {len(hosts)} host(s) joined ({backend}, rendezvous "
             f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}) and all-reduced in {elapsed_s:.1f}s"]
    lines += [f"preflight:   rank {row['rank']:>4}  {row['host']:<24} binds {row['binds']}"
              f"{_LOOPBACK if len(hosts) > 1 and row['binds'].startswith('127.') else ''}" for row in table]
    return "\n".join(lines)
