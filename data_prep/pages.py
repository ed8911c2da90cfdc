"""Memory flat in the data size: pages of prep's own memory-mapped Arrow files are handed back as it goes.

`datasets` memory-maps every Arrow file it reads (the sources' Arrow copies and each stage's output). A
page of a mapping, once read, counts in the process's resident memory until the mapping is closed, and
prep keeps its datasets open from the first stage to the last, so reading 34M tokens' worth of Arrow files
left ~0.5 GB resident at the end of a 1000x run, growing with the data. The pages are clean copies of the
files (page cache), so telling the kernel that the process no longer needs them (``madvise`` DONTNEED)
is free of risk: a later read of the same rows faults them in again from the page cache or the file,
byte for byte the same. :class:`PageReleaser` does that for the read-only mappings under prep's work
folder after every batch a stage reads, so resident memory holds one batch of rows per stage rather than
the data set. Mappings that can be written, and every file outside that folder, are never touched.

The same call also returns freed heap memory to the system (glibc's ``malloc_trim`` and Arrow's pool):
the Python strings and lists of each batch are freed, but the allocators kept the pages, ~30 MB more per
70,000 rows, which a profile of a 200x run showed as the rest of the growth (live data stayed flat).

A release costs ~20-40 ms (reading /proc/self/maps, trimming the heap), which after every batch of 1,000
rows was ~5% of prep's CPU time; so a call releases only once resident memory has grown by
:data:`RELEASE_STEP_BYTES` since the last release (one read of /proc/self/statm otherwise), which keeps the
bound (a step plus a batch) at a fraction of the cost.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import re
import sys
from pathlib import Path

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
RELEASE_STEP_BYTES = 16 * 2**20  # growth of resident memory that triggers a release


@functools.cache
def _libc():
    # The process's own symbols (libc among them), not find_library("c"): that runs ldconfig in a forked
    # child, which for a moment counts the whole parent's memory again in the process tree.
    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def _madvise():
    lib = _libc()
    lib.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return lib.madvise


def read_only_mappings(roots: tuple[str, ...], maps_text: str) -> list[tuple[int, int]]:
    """(start, end) of the read-only file mappings under any of ``roots`` in a /proc/<pid>/maps listing."""
    out = []
    for root in roots:
        # One regex pass per root: the listing has ~1,000 lines (every shared library), few of them ours.
        pattern = rf"^([0-9a-f]+)-([0-9a-f]+) r-\S\S \S+ \S+ \S+ +{re.escape(root)}"
        out.extend((int(m[1], 16), int(m[2], 16)) for m in re.finditer(pattern, maps_text, re.M))
    return sorted(out)


class PageReleaser:
    """Calling it releases the resident pages of read-only mappings of files under ``roots`` (folders) and
    the heap's free pages (picklable, so datasets' worker processes release their own), once resident
    memory has grown by ``step_bytes`` since its last release in this process (0: at every call). Linux
    only; a no-op elsewhere."""

    def __init__(self, roots: list[Path], step_bytes: int = RELEASE_STEP_BYTES):
        self.roots = tuple(f"{Path(r).resolve()}/" for r in roots)
        self.step_bytes = step_bytes
        self.last = (0, 0)  # (process id, resident bytes) after the last release; a worker starts afresh

    def __call__(self) -> None:
        if not sys.platform.startswith("linux"):
            return
        if self.step_bytes and self.last[0] == os.getpid() and resident_bytes() < self.last[1] + self.step_bytes:
            return
        self.release()
        if self.step_bytes:
            self.last = (os.getpid(), resident_bytes())

    def release(self) -> None:
        """Release now: the mapped pages under the roots and the heap's free pages."""
        try:
            with open(f"/proc/{os.getpid()}/maps", encoding="utf-8", errors="replace") as fh:
                ranges = read_only_mappings(self.roots, fh.read())
        except OSError:
            return
        madvise = _madvise()
        for start, end in ranges:
            madvise(start, end - start, _MADV_DONTNEED)
        release_free_heap()


def resident_bytes() -> int:
    """This process's resident memory (/proc/self/statm)."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_heap() -> None:
    """Hand the free pages of the C heap (glibc) and of Arrow's memory pool back to the system."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = getattr(_libc(), "malloc_trim", None)  # glibc only (musl has none)
    if trim is not None:
        trim(0)


class Releasing:
    """A batch function that releases mapped pages after each batch (picklable, for datasets' map)."""

    def __init__(self, fn, release: PageReleaser):
        self.fn, self.release = fn, release

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.release()
        return out
