"""Per-rank heartbeats and stack dumps, so that a hung multi-node job says which rank, where, and why.

Each rank keeps one small JSON file, ``RUN_DIR/heartbeats/rank-NNNNN.json``: its host, pid, step, phase
(data / forward / backward / step / eval / save) and when it entered that phase. ``zerotune status RUN_DIR``
(launcher/status.py) reads them all and names the ranks that are behind or silent.

Each rank also dumps the Python stacks of all its threads (faulthandler) to
``RUN_DIR/heartbeats/rank-NNNNN.stacks``: on SIGUSR2, and when one step (or one evaluation, or one save)
has lasted nearly as long as the collective timeout (a rank stuck in a collective is about to time out;
the dump says where it waits).

Cost at scale: one in-place write of a fixed-size record per phase change (1 + 3 x accumulation per step)
on the rank's own file, and one re-arm of the stall timer per step; no collective, no device sync. Measured
in benchmarks/RESULTS.md (heartbeat cost): tens of microseconds per step against steps of 100s of ms.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import time
from pathlib import Path

# In the order a rank passes through them within optimizer step N (eval and save follow step N's update);
# "exit" is written once the rank's training has ended.
PHASES = ("data", "forward", "backward", "step", "eval", "save", "exit")
HEARTBEAT_DIR = "heartbeats"
RECORD_BYTES = 1024  # the record is rewritten in place, space-padded to this size (JSON ignores the padding)
# Phases that re-arm the stall timer: each step's start, and evaluation and saving (which may be long).
_ARMING_PHASES = ("data", "eval", "save")
DUMP_SIGNAL = signal.SIGUSR2
# Test hook: "RANK:STEP:SECONDS" makes that rank sleep at the start of that step's forward (a laggard).
FAULT_SLEEP_ENV = "ZEROTUNE_FAULT_SLEEP_IN_STEP"


def heartbeat_path(run_dir: str | Path, rank: int) -> Path:
    """Where rank ``rank`` writes its heartbeat."""
    return Path(run_dir) / HEARTBEAT_DIR / f"rank-{rank:05d}.json"


def stacks_path(run_dir: str | Path, rank: int) -> Path:
    """Where rank ``rank`` dumps its Python stacks (SIGUSR2, or a phase as long as the collective timeout)."""
    return Path(run_dir) / HEARTBEAT_DIR / f"rank-{rank:05d}.stacks"


class Heartbeat:
    """This rank's heartbeat file and stack-dump triggers; ``beat(step, phase)`` at every phase change."""

    def __init__(self, run_dir: str | Path, rank: int, world_size: int, stall_dump_s: float | None):
        self.path = heartbeat_path(run_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Rewritten in place (a rename per beat costs ~50x more); readers retry a torn read.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.identity = {"rank": rank, "world_size": world_size, "host": socket.gethostname(), "pid": os.getpid()}
        self.stall_dump_s = stall_dump_s
        # Kept open for the life of the process: faulthandler writes to its file descriptor from a signal
        # handler or its watchdog thread, where nothing can be opened.
        self._stacks = open(stacks_path(run_dir, rank), "a", encoding="utf-8")
        faulthandler.register(DUMP_SIGNAL, file=self._stacks, all_threads=True)
        self._sleep_at = _fault_sleep(rank)
        self.step = 0

    def beat(self, step: int, phase: str, micro: int = 0) -> None:
        """Record that this rank entered ``phase`` (of micro-batch ``micro``) of optimizer step ``step``."""
        record = {**self.identity, "step": step, "phase": phase, "micro": micro, "time": time.time()}
        os.pwrite(self._fd, json.dumps(record).encode("utf-8")[:RECORD_BYTES].ljust(RECORD_BYTES), 0)
        self.step = step
        if self.stall_dump_s and phase in _ARMING_PHASES:
            faulthandler.dump_traceback_later(self.stall_dump_s, repeat=False, file=self._stacks)
        if self._sleep_at and self._sleep_at[0] == step and phase == "forward" and micro == 0:
            time.sleep(self._sleep_at[1])

    def close(self) -> None:
        """Write the final "exit" heartbeat, stop the stall timer and the SIGUSR2 dump."""
        self.beat(self.step, "exit")
        faulthandler.cancel_dump_traceback_later()
        faulthandler.unregister(DUMP_SIGNAL)
        self._stacks.close()
        os.close(self._fd)


def _fault_sleep(rank: int) -> tuple[int, float] | None:
    spec = os.environ.get(FAULT_SLEEP_ENV)
    if not spec:
        return None
    sleeper, step, seconds = spec.split(":")
    return (int(step), float(seconds)) if int(sleeper) == rank else None


def flight_recorder_env(run_dir: str | Path) -> dict[str, str]:
    """torch's NCCL flight recorder: keep the last collectives per rank and dump them on a timeout, into
    ``RUN_DIR/heartbeats/nccl_trace_rank_N`` (read with ``python -m torch.distributed.flight_recorder.fr_trace``)."""
    return {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(Path(run_dir).resolve() / HEARTBEAT_DIR / "nccl_trace_rank_")}


def enable_flight_recorder(run_dir: str | Path, cuda: bool | None = None) -> dict[str, str]:
    """On CUDA, set the flight recorder's variables (before the process group starts) unless already set;
    returns what was set."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return {}
    (Path(run_dir) / HEARTBEAT_DIR).mkdir(parents=True, exist_ok=True)
    wanted = {k: v for k, v in flight_recorder_env(run_dir).items() if k not in os.environ}
    os.environ.update(wanted)
    return wanted


def read_heartbeats(run_dir: str | Path) -> list[dict]:
    """Every rank's last heartbeat in ``run_dir``, by rank (a read torn by a concurrent write is retried)."""
    beats = []
    for path in sorted((Path(run_dir) / HEARTBEAT_DIR).glob("rank-*.json")):
        for _ in range(5):
            try:
                beats.append(json.loads(path.read_bytes()))
                break
            except (OSError, json.JSONDecodeError):
                time.sleep(0.01)
    return sorted(beats, key=lambda b: b["rank"])
