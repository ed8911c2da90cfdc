"""Stage 5, packing: documents into sequences of at most seq_len tokens, best-fit decreasing.

Best-fit decreasing places each document, longest first, into the open sequence with the least room that
still fits it. Open sequences are kept in stacks by remaining room, and :class:`RoomIndex` (a 64-ary bit
tree over the rooms 0..seq_len) finds the smallest room >= the document's length in O(log_64 seq_len)
word operations, so packing costs O(documents x log seq_len) however long the context is (three levels
of 64-bit words cover seq_len 262,143). 1M documents at seq_len 32,768 pack in seconds, where a scan over
seq_len + 1 counters per document took minutes.
"""

from __future__ import annotations

from array import array
from typing import NamedTuple

import numpy as np

PACK_BLOCK_DOCS = 65_536  # documents whose lengths the packer turns into Python ints at a time
_WORD_BITS = 64


def _lowest_bit(word: int) -> int:
    return (word & -word).bit_length() - 1


class RoomIndex:
    """The set of rooms (0..size-1) that have an open sequence, with "smallest member >= x" queries.

    Level 0 holds one bit per room in 64-bit words; each level above holds one bit per non-zero word of
    the level below, so a query climbs until it meets a set bit and then descends by lowest set bits.
    """

    def __init__(self, size: int):
        self.levels: list[list[int]] = []
        n = size
        while True:
            words = -(-n // _WORD_BITS)
            self.levels.append([0] * words)
            if words == 1:
                break
            n = words

    def add(self, pos: int) -> None:
        """Mark ``pos`` as present."""
        for level in self.levels:
            w, was = pos >> 6, level[pos >> 6]
            level[w] = was | (1 << (pos & 63))
            if was:  # the levels above already know this word is non-zero
                return
            pos = w

    def discard(self, pos: int) -> None:
        """Mark ``pos`` as absent."""
        for level in self.levels:
            w = pos >> 6
            level[w] &= ~(1 << (pos & 63))
            if level[w]:
                return
            pos = w

    def first_at_least(self, pos: int) -> int | None:
        """The smallest present member >= ``pos``, or None."""
        depth = 0
        for depth, level in enumerate(self.levels):
            w = pos >> 6
            word = level[w] >> (pos & 63) if w < len(level) else 0
            if word:
                pos += _lowest_bit(word)
                break
            pos = w + 1
        else:
            return None
        for level in reversed(self.levels[:depth]):
            pos = (pos << 6) + _lowest_bit(level[pos])
        return pos


class Packing(NamedTuple):
    """Sequences as arrays (8 bytes per document, no Python object per document): sequence ``j`` holds the
    documents ``members[starts[j]:starts[j + 1]]``, in the order they were placed."""

    members: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.starts) - 1

    def as_lists(self) -> list[list[int]]:
        """The sequences as lists of document indices."""
        return [self.members[a:b].tolist() for a, b in zip(self.starts[:-1].tolist(), self.starts[1:].tolist())]

    def take(self, sequences) -> tuple[np.ndarray, np.ndarray]:
        """(documents of ``sequences`` one sequence after another, documents per sequence)."""
        sequences = np.asarray(sequences, dtype=np.int64)
        counts = self.starts[sequences + 1] - self.starts[sequences]
        # Position of each output document in members: its sequence's start plus its rank inside it.
        first = np.repeat(self.starts[sequences] - (np.cumsum(counts) - counts), counts)
        return self.members[first + np.arange(int(counts.sum()), dtype=np.int64)], counts


def pack_best_fit(lengths: np.ndarray, seq_len: int, desc: str | None = None) -> Packing:
    """Group document indices into sequences whose lengths sum to at most seq_len (BFD; deterministic).

    Among open sequences with the same room the one opened or filled last is taken. ``desc`` shows a
    progress bar with that label.
    """
    from tqdm.auto import tqdm

    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > seq_len:
        raise ValueError(f"a document of {lengths.max()} tokens exceeds seq_len {seq_len}")
    # int32 keys (lengths are at most seq_len): the same stable order as int64 keys, half the copy.
    order = np.argsort(-lengths.astype(np.int32), kind="stable")
    rooms = RoomIndex(seq_len + 1)
    by_room: list[list[int]] = [[] for _ in range(seq_len + 1)]  # open sequences per remaining room
    seq_of = array("i")  # the sequence of each document, in placement (order) order (4 bytes a document)
    n_seqs = 0
    with tqdm(total=len(order), desc=desc, unit="doc", disable=desc is None, leave=False, mininterval=1.0) as bar:
        # Lengths as Python ints a block at a time: one list of every document's length was ~36 bytes a
        # document, the largest thing prep held while packing a large split.
        for block in range(0, len(order), PACK_BLOCK_DOCS):
            for need in lengths[order[block:block + PACK_BLOCK_DOCS]].tolist():
                room = rooms.first_at_least(need)
                if room is None:
                    room, b = seq_len, n_seqs
                    n_seqs += 1
                else:
                    b = by_room[room].pop()
                    if not by_room[room]:
                        rooms.discard(room)
                seq_of.append(b)
                left = room - need
                if left > 0:  # a full sequence never takes another document
                    by_room[left].append(b)
                    rooms.add(left)
            bar.update(min(PACK_BLOCK_DOCS, len(order) - block))
    seq_of_np = np.frombuffer(seq_of, dtype=np.int32) if len(seq_of) else np.zeros(0, dtype=np.int32)
    members = order[np.argsort(seq_of_np, kind="stable")]  # stable: placement order inside a sequence
    starts = np.concatenate([[0], np.cumsum(np.bincount(seq_of_np, minlength=n_seqs))]).astype(np.int64)
    return Packing(members, starts)


def pack_best_fit_scan(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """The slow, obviously-correct reference for :func:`pack_best_fit` (same bins): one vectorised scan over
    seq_len + 1 counters of open sequences per document, O(documents x seq_len). Tests and the packing
    benchmark compare the two."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    open_count = np.zeros(seq_len + 1, dtype=np.int64)  # open sequences per remaining room
    by_room: list[list[int]] = [[] for _ in range(seq_len + 1)]
    bins: list[list[int]] = []
    for doc in order.tolist():
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
        if room - need > 0:
            by_room[room - need].append(b)
            open_count[room - need] += 1
    return bins


def no_packing(n_docs: int) -> Packing:
    """One document per sequence, in order (data.packing: false)."""
    return Packing(np.arange(n_docs, dtype=np.int64), np.arange(n_docs + 1, dtype=np.int64))


def packing_efficiency(total_tokens: int, n_sequences: int, seq_len: int) -> float:
    """Real tokens / (sequences x seq_len), as FORMAT.md defines it (0 when there is nothing)."""
    return total_tokens / (n_sequences * seq_len) if n_sequences else 0.0


def assign_to_shards(n_sequences: int, num_shards: int) -> list[range]:
    """Sequence indices per shard, round-robin, so shards get similar token counts; fewer shards than asked
    when there are fewer sequences, none when there are none."""
    count = min(num_shards, n_sequences)
    return [range(s, n_sequences, count) for s in range(count)]
