"""Work units of distributed prep: which unit a document belongs to, which worker runs a unit, and where a
unit's finished output lives.

A unit is one output shard. A document's unit comes from its content hash (the dedup hash), so exact
duplicates always meet in one unit and a document lands in the same unit however many workers run prep.
Each unit is templated, tokenized and packed on its own, so its shard bytes depend on its documents only:
1 worker and N workers write the same shards. The cost is packing within a shard instead of across the
whole split (benchmarks/RESULTS.md gives the efficiency lost).

A unit's output is built in a private temporary folder and renamed into ``unit-NNNNN`` when complete, so a
worker killed mid-unit leaves only a temporary folder behind, and a re-run does exactly the units that
have no finished folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

UNIT_DONE_FILE = "unit.json"  # written last inside the unit's temporary folder, before the rename


def unit_of(hashes: np.ndarray, num_units: int) -> np.ndarray:
    """Unit index per document from its signed 64-bit content hash.

    The split reads the hash's top bits as a number in [0, 1) (split.py); the unit takes its low 32 bits,
    so which unit a document lands in says nothing about its split.
    """
    bits = np.asarray(hashes, dtype=np.int64).view(np.uint64)
    return ((bits & np.uint64(0xFFFFFFFF)) % np.uint64(num_units)).astype(np.int32)


def units_of_worker(worker: int, workers: int, num_units: int) -> list[int]:
    """The units worker ``worker`` of ``workers`` runs: every ``workers``-th unit from its own index."""
    if workers < 1 or not 0 <= worker < workers:
        raise ValueError(f"worker {worker} of {workers}: expected 0 <= worker < workers")
    return list(range(worker, num_units, workers))


def unit_dir(units_root: Path, unit: int) -> Path:
    """The finished folder of ``unit``."""
    return Path(units_root) / f"unit-{unit:05d}"


def shard_name(unit: int) -> str:
    """The shard name a unit writes in every split (its index, so names are stable across worker counts)."""
    return f"shard-{unit:05d}"


def missing_units(units_root: Path, num_units: int) -> list[int]:
    """Units without a finished folder."""
    return [u for u in range(num_units) if not (unit_dir(units_root, u) / UNIT_DONE_FILE).is_file()]


def describe_units(units: list[int], limit: int = 8) -> str:
    """'1, 3 and 5' style list of unit indices, shortened after ``limit``."""
    shown = [str(u) for u in units[:limit]]
    if len(units) > limit:
        return ", ".join(shown) + f" and {len(units) - limit} more"
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
