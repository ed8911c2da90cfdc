"""How many processes prep's `datasets.map` stages use, and one tokenizer thread in each.

``data.num_proc`` is a positive int or ``"auto"`` (the default). :func:`resolve_num_proc` turns it into a
count once per run: ``auto`` is the CPUs this process may use (:func:`usable_cpus`: its CPU affinity,
which SLURM and taskset set, further limited by a cgroup CPU quota, as containers set), capped at
:data:`MAX_AUTO_PROCS`. A stage then uses :func:`stage_procs`: no more processes than it has batches of
data.map_batch_size rows, and none forked at all for one, so small data never pays for a pool.

While prep runs, :func:`one_tokenizer_thread` turns the fast tokenizer's own Rust thread pool off
(``TOKENIZERS_PARALLELISM=false``) unless the user's environment sets the variable: the tokenizers
library reads it at every batch call, and `datasets` turns it off in its forked workers anyway, so with it
off num_proc N means N processes of one thread each, N cores, whether N is 1 or more.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import NamedTuple

# auto never forks more workers than this: past ~16 the serial stages (read, dedup, packing, writing)
# dominate the wall time, and every worker holds its own copy of the tokenizer, templater and one batch
# of rows, so memory grows with the count. An explicit data.num_proc may go higher.
MAX_AUTO_PROCS = 16
CGROUP_ROOT = Path("/sys/fs/cgroup")
TOKENIZERS_PARALLELISM = "TOKENIZERS_PARALLELISM"


class Procs(NamedTuple):
    """data.num_proc resolved for one run: the process count and why (for the run's log line)."""

    count: int
    why: str


def resolve_num_proc(setting) -> Procs:
    """data.num_proc (a positive int, or "auto": the usable CPUs capped at MAX_AUTO_PROCS) as a count."""
    if setting != "auto":
        return Procs(int(setting), f"data.num_proc {setting}")
    cpus, why = usable_cpus()
    if cpus > MAX_AUTO_PROCS:
        return Procs(MAX_AUTO_PROCS, f"data.num_proc auto: {why}, capped at {MAX_AUTO_PROCS}")
    return Procs(cpus, f"data.num_proc auto: {why}")


def stage_procs(count: int, rows: int, batch_rows: int) -> int | None:
    """Processes one map stage over ``rows`` rows in batches of ``batch_rows`` uses: at most one per batch;
    None (no pool, this process) when that is one."""
    used = min(count, math.ceil(rows / batch_rows))
    return used if used > 1 else None


def describe(procs: Procs, rows: int, batch_rows: int) -> str:
    """The run's log line: the processes a stage over ``rows`` rows uses, and why."""
    used = stage_procs(procs.count, rows, batch_rows) or 1
    plural = "process" if used == 1 else "processes"
    if used < procs.count:
        batches = math.ceil(rows / batch_rows)
        return (f"{used} {plural} ({procs.why}; {rows} rows are {batches} batch{'' if batches == 1 else 'es'} "
                f"of data.map_batch_size {batch_rows})")
    return f"{used} {plural} ({procs.why})"


def usable_cpus(affinity=None, cgroup_root: Path = CGROUP_ROOT, self_cgroup: str | None = None) -> tuple[int, str]:
    """(CPUs this process may use, how that was found): its affinity (``os.sched_getaffinity``, else
    ``os.cpu_count()``) limited by a cgroup CPU quota when one is set (:func:`cgroup_cpu_quota`)."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # not on Linux
            affinity = range(os.cpu_count() or 1)
    cpus = max(1, len(affinity))
    quota = cgroup_cpu_quota(cgroup_root, self_cgroup)
    if quota is not None and quota < cpus:
        return quota, f"{quota} usable CPUs (a cgroup CPU quota of {quota} of the {cpus} in this process's affinity)"
    return cpus, f"{cpus} usable CPU{'s' if cpus > 1 else ''}"


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, self_cgroup: str | None = None) -> int | None:
    """The tightest CPU quota on this process's cgroup or its ancestors, in whole CPUs (rounded up), or None.

    cgroup v2: ``cpu.max`` holds "QUOTA PERIOD" ("max": none); cgroup v1: ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us`` (-1: none). ``self_cgroup`` is the text of /proc/self/cgroup (read when None).
    """
    if self_cgroup is None:
        try:
            self_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            self_cgroup = ""
    quotas = [q for folder in _cpu_cgroup_folders(root, self_cgroup) if (q := _quota_in(folder)) is not None]
    return min(quotas) if quotas else None


def _cpu_cgroup_folders(root: Path, self_cgroup: str) -> list[Path]:
    """This process's cgroup folders that may hold a CPU quota, deepest first, up to each hierarchy's root."""
    bases = []
    for line in self_cgroup.splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            bases.append((root, path))  # v2: one unified hierarchy mounted at the root
        elif "cpu" in controllers.split(","):
            bases += [(root / name, path) for name in (controllers, "cpu", "cpu,cpuacct")]  # v1 mount names
    if not bases:
        bases = [(root, "/"), (root / "cpu", "/"), (root / "cpu,cpuacct", "/")]
    folders = []
    for base, path in bases:
        parts = [p for p in path.split("/") if p]
        folders += [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return list(dict.fromkeys(folders))


def _quota_in(folder: Path) -> int | None:
    try:
        if (folder / "cpu.max").is_file():
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else _whole_cpus(int(quota), int(period))
        if (folder / "cpu.cfs_quota_us").is_file():
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            return None if quota < 0 else _whole_cpus(quota, int((folder / "cpu.cfs_period_us").read_text()))
    except (OSError, ValueError):  # unreadable or unexpected contents: no quota we can trust
        return None
    return None


def _whole_cpus(quota: int, period: int) -> int | None:
    return max(1, math.ceil(quota / period)) if period > 0 else None


@contextlib.contextmanager
def one_tokenizer_thread():
    """Within: TOKENIZERS_PARALLELISM=false unless the environment already sets it (then left alone); the
    environment is restored on exit, also on error."""
    if TOKENIZERS_PARALLELISM in os.environ:
        yield
        return
    os.environ[TOKENIZERS_PARALLELISM] = "false"
    try:
        yield
    finally:
        # `datasets` replaces os.environ by a copy around its pools: look it up again here.
        os.environ.pop(TOKENIZERS_PARALLELISM, None)
