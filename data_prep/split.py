"""Stage 4, the split: train / validation / test assigned by content hash.

A row's split depends on its own content only, so the same row always lands in the same split, duplicates
share a split, and adding rows never moves earlier ones.
"""

from __future__ import annotations

import numpy as np

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def assign_splits(hashes: np.ndarray, validation_fraction: float, test_fraction: float) -> np.ndarray:
    """Split id per row (0 train, 1 validation, 2 test) from its signed 64-bit content hash."""
    # The hash's bits as a uniform number in [0, 1).
    unit = np.asarray(hashes, dtype=np.int64).view(np.uint64).astype(np.float64)
    unit /= 2.0 ** 64  # in place: one float array per row, not two
    out = np.zeros(len(unit), dtype=np.int8)
    out[unit < validation_fraction + test_fraction] = SPLIT_IDS["validation"]
    out[unit < test_fraction] = SPLIT_IDS["test"]
    return out


def cross_split_overlap(prompt_hashes: np.ndarray, split_ids: np.ndarray) -> dict[str, int]:
    """How many distinct prompts appear in two splits (e.g. one question with two different answers).

    Returns counts for train/validation, train/test and validation/test; a prompt hash of 0 means "no
    prompt" (text rows) and is ignored.
    """
    # Sorted unique arrays, not Python sets: 8 bytes per prompt instead of ~70 (flat memory at scale).
    uniq = {name: np.unique(prompt_hashes[(split_ids == sid) & (prompt_hashes != 0)])
            for name, sid in SPLIT_IDS.items()}
    both = lambda a, b: len(np.intersect1d(uniq[a], uniq[b], assume_unique=True))  # noqa: E731
    return {"train/validation": both("train", "validation"), "train/test": both("train", "test"),
            "validation/test": both("validation", "test")}
