"""Stage 5, packing: documents into sequences of at most seq_len tokens, best-fit decreasing.

Best-fit decreasing places each document, longest first, into the open sequence with the least room that
still fits it. Open sequences are kept in buckets by remaining room, so finding the best fit is one
vectorised scan over seq_len + 1 counters rather than a scan over all sequences.
"""

from __future__ import annotations

import numpy as np


def pack_best_fit(lengths: np.ndarray, seq_len: int, desc: str | None = None) -> list[list[int]]:
    """Group document indices into sequences whose lengths sum to at most seq_len (BFD; deterministic).

    ``desc`` shows a progress bar with that label.
    """
    from tqdm.auto import tqdm

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > seq_len:
        raise ValueError(f"a document of {lengths.max()} tokens exceeds seq_len {seq_len}")
    order = np.argsort(-lengths, kind="stable")
    open_count = np.zeros(seq_len + 1, dtype=np.int64)  # open sequences per remaining room
    by_room: list[list[int]] = [[] for _ in range(seq_len + 1)]
    bins: list[list[int]] = []
    for doc in tqdm(order.tolist(), desc=desc, unit="doc", disable=desc is None, leave=False, mininterval=1.0):
        need = int(lengths[doc])
        fits = np.flatnonzero(open_count[need:])
        if fits.size:
            room = need + int(fits[0])
            b = by_room[room].pop()
            open_count[room] -= 1
        else:
            room, b = seq_len, len(bins)
            bins.append([])
        bins[b].append(doc)
        left = room - need
        if left > 0:  # a full sequence never takes another document
            by_room[left].append(b)
            open_count[left] += 1
    return bins


def no_packing(n_docs: int) -> list[list[int]]:
    """One document per sequence, in order (data.packing: false)."""
    return [[i] for i in range(n_docs)]


def packing_efficiency(total_tokens: int, n_sequences: int, seq_len: int) -> float:
    """Real tokens / (sequences x seq_len), as FORMAT.md defines it (0 when there is nothing)."""
    return total_tokens / (n_sequences * seq_len) if n_sequences else 0.0


def assign_to_shards(n_sequences: int, num_shards: int) -> list[list[int]]:
    """Sequence indices per shard, round-robin, so shards get similar token counts; fewer shards than asked
    when there are fewer sequences, none when there are none."""
    count = min(num_shards, n_sequences)
    return [list(range(s, n_sequences, count)) for s in range(count)]
