"""Memory-mapped data loading: the global training order, its split across ranks, and the collator.

Training reads one order for the whole run, independent of the world size: per epoch a permutation of all
training sequences drawn from ``(seed, epoch)`` alone (``epoch_order``). Optimizer step s of an epoch takes
sequences ``[s * G, (s + 1) * G)`` of it (G = the global batch size), and ``deal_step`` splits them across
ranks so each rank gets the same number of sequences and near-equal supervised-token counts (the tokens the
loss is normalised by; packed rows are near-full, so their lengths differ far less). The data position is
therefore the number of sequences consumed, the same on 1 rank or 64: a resume on another world size with
the same global batch trains on exactly the sequences an uninterrupted run would have.

Cost at scale: each rank reads the labels of all G sequences of a step (to deal them; at 64 ranks, G 512
and 4,096 tokens that is 8 MiB of memory-mapped int32 per step, from the page cache after the first epoch)
and the tokens of its own G / world_size.

Evaluation splits are still read as contiguous per-rank blocks (``assign_sequences``): their result is a
sum over every sequence, whatever the layout.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from data_prep.format import IGNORE_INDEX, Shard

# (shard name, first sequence, one past the last sequence) within one split.
SequenceRange = tuple[str, int, int]


class DataError(ValueError):
    """Prepared data that cannot feed this run (too small, wrong tokenizer, missing split)."""

    user_error = True


def assign_sequences(manifest: dict, split: str, world_size: int) -> list[list[SequenceRange]]:
    """Split ``split``'s sequences into ``world_size`` equal, contiguous, deterministic parts.

    Rank r gets global sequence indices ``[r * n, (r + 1) * n)`` with ``n = ceil(total / world_size)``;
    indices past the end wrap around to the start (so every rank has exactly ``n``). Returns, per rank, a
    list of ``(shard_name, start, stop)`` ranges in order. An empty split gives empty lists.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    shards = [(s["name"], int(s["sequences"])) for s in manifest["splits"].get(split, {}).get("shards", [])]
    total = sum(count for _, count in shards)
    if total == 0:
        return [[] for _ in range(world_size)]
    per_rank = -(-total // world_size)
    return [_ranges(shards, total, rank * per_rank, per_rank) for rank in range(world_size)]


def _ranges(shards: list[tuple[str, int]], total: int, first: int, count: int) -> list[SequenceRange]:
    """The ranges covering global indices first .. first + count - 1 (mod total), in that order."""
    out: list[SequenceRange] = []
    index, end = first, first + count
    while index < end:
        lo = index % total
        span = min(end - index, total - lo)  # up to the end of the split, then wrap around
        out.extend(_shard_ranges(shards, lo, lo + span))
        index += span
    return out


def _shard_ranges(shards: list[tuple[str, int]], lo: int, hi: int) -> list[SequenceRange]:
    """Global indices [lo, hi) as per-shard ranges."""
    out, shard_start = [], 0
    for name, count in shards:
        a, b = max(lo, shard_start), min(hi, shard_start + count)
        if a < b:
            out.append((name, a - shard_start, b - shard_start))
        shard_start += count
    return out


@dataclass
class RankSequences:
    """The sequences one rank reads from one split, memory-mapped.

    Local index j is a wrap-around repeat (padding so every rank has as many) when ``j >= first_repeat``.
    Only the ranges are held in memory, never a per-sequence list.
    """

    data_dir: Path
    split: str
    ranges: list[SequenceRange]
    first_repeat: int

    @classmethod
    def open(cls, data_dir: str | Path, manifest: dict, split: str, rank: int, world_size: int) -> "RankSequences":
        ranges = assign_sequences(manifest, split, world_size)[rank]
        per_rank = sum(hi - lo for _, lo, hi in ranges)
        total = sum(int(s["sequences"]) for s in manifest["splits"].get(split, {}).get("shards", []))
        first_repeat = min(per_rank, max(0, total - rank * per_rank))
        return cls(Path(data_dir), split, ranges, first_repeat)

    def __post_init__(self):
        self._starts = np.cumsum([0] + [hi - lo for _, lo, hi in self.ranges])
        self._shards: dict[str, Shard] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def is_repeat(self, j: int) -> bool:
        return j >= self.first_repeat

    def locate(self, j: int) -> tuple[str, int]:
        """(shard name, sequence index within the shard) of local index j."""
        k = int(np.searchsorted(self._starts, j, side="right") - 1)
        name, lo, _ = self.ranges[k]
        return name, lo + j - int(self._starts[k])

    def get(self, j: int) -> dict[str, np.ndarray]:
        name, i = self.locate(j)
        input_ids, labels, position_ids = self._shard(name).sequence(i)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}

    def supervised_tokens(self, j: int) -> int:
        """Supervised tokens (labels != -100) in local sequence j (reads its labels only)."""
        name, i = self.locate(j)
        return int(np.count_nonzero(self._shard(name).sequence(i)[1] != IGNORE_INDEX))

    def _shard(self, name: str) -> Shard:
        if name not in self._shards:
            self._shards[name] = Shard.open(self.data_dir, self.split, name)
        return self._shards[name]


def epoch_order(num_sequences: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of all of a split's sequences for ``epoch``: a pure function of (seed, epoch), the
    same on every rank and for every world size."""
    return np.random.default_rng([seed, epoch]).permutation(num_sequences)


def deal_step(tokens: list[int], world_size: int) -> list[list[int]]:
    """Split one step's sequences (given by their token counts) into ``world_size`` equal-sized groups
    with near-equal token sums; returns, per rank, positions into ``tokens``, largest first.

    Largest first, each sequence goes to the rank with the fewest tokens so far that still has room (ties:
    the lower rank; a stable sort, so equal counts keep their order). Deterministic for given counts and
    world size, O(G log world_size) per step with a heap.
    """
    per_rank, extra = divmod(len(tokens), world_size)
    if extra:
        raise ValueError(f"{len(tokens)} sequences cannot be dealt equally to {world_size} ranks")
    largest_first = sorted(range(len(tokens)), key=lambda i: -tokens[i])
    out: list[list[int]] = [[] for _ in range(world_size)]
    heap = [(0, rank) for rank in range(world_size)]
    for i in largest_first:
        total, rank = heapq.heappop(heap)
        out[rank].append(i)
        if len(out[rank]) < per_rank:
            heapq.heappush(heap, (total + tokens[i], rank))
    return out


class Collator:
    """Pads a list of sequences into one batch of [B, T] tensors.

    ``input_ids`` pad with ``pad_token_id``, ``labels`` with -100, ``position_ids`` with 0, and
    ``attention_mask`` is 1 on real tokens, 0 on padding. T is the longest sequence, or ``pad_to_tokens``
    when given (fixed shapes).

    The document bounds come from the host too: ``cu_seqlens`` (int32 [D + 1], CPU) holds the cumulative
    lengths of the batch's D documents over its real tokens laid end to end (rows concatenated, padding
    dropped), and ``max_seqlen`` the longest document, so no step reads position ids back from the device.
    """

    def __init__(self, pad_token_id: int, pad_to_tokens: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_tokens = pad_to_tokens

    def __call__(self, sequences: list[dict[str, np.ndarray]], drop_labels: list[bool] | None = None) -> dict:
        longest = max(len(s["input_ids"]) for s in sequences)
        length = max(longest, self.pad_to_tokens or 0)
        size = len(sequences)
        batch = {
            "input_ids": torch.full((size, length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((size, length), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros((size, length), dtype=torch.long),
            "attention_mask": torch.zeros((size, length), dtype=torch.long),
        }
        for row, seq in enumerate(sequences):
            n = len(seq["input_ids"])
            batch["input_ids"][row, :n] = torch.from_numpy(np.asarray(seq["input_ids"], dtype=np.int64))
            batch["position_ids"][row, :n] = torch.from_numpy(np.asarray(seq["position_ids"], dtype=np.int64))
            batch["attention_mask"][row, :n] = 1
            if not (drop_labels and drop_labels[row]):
                batch["labels"][row, :n] = torch.from_numpy(np.asarray(seq["labels"], dtype=np.int64))
        lengths = np.concatenate([document_lengths(s["position_ids"]) for s in sequences])
        batch["cu_seqlens"] = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        batch["max_seqlen"] = int(lengths.max()) if len(lengths) else 0
        return batch


def document_lengths(position_ids: np.ndarray) -> np.ndarray:
    """Lengths of the documents packed in one sequence: a document starts at position 0 (and at the row start)."""
    position_ids = np.asarray(position_ids)
    if len(position_ids) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(position_ids == 0)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    return np.diff(np.concatenate([starts, [len(position_ids)]]))


class TrainBatches:
    """One rank's micro-batches, epoch after epoch, from the global order, starting at a saved position.

    ``sequences`` is the whole training split. A position is ``(epoch, step_in_epoch)``; optimizer step s
    consumes sequences ``[s * G, (s + 1) * G)`` of the epoch's order (G = micro x accumulation x world
    size), dealt across ranks by supervised tokens (``deal_step``); this rank's share is cut into
    ``accumulation`` micro-batches in that order. A partial step at the end of an epoch is dropped.
    """

    def __init__(self, sequences: RankSequences, collator: Collator, micro_batch_size: int,
                 accumulation: int, world_size: int, rank: int, seed: int):
        self.sequences, self.collator = sequences, collator
        self.micro_batch_size, self.accumulation = micro_batch_size, accumulation
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.global_batch_size = micro_batch_size * accumulation * world_size
        self.steps_per_epoch = len(sequences) // self.global_batch_size

    def step_sequences(self, epoch: int, step_in_epoch: int) -> list[list[int]]:
        """Per rank, the split indices of its sequences for this step, in micro-batch order."""
        first = step_in_epoch * self.global_batch_size
        picks = [int(j) for j in self._order(epoch)[first:first + self.global_batch_size]]
        dealt = deal_step([self.sequences.supervised_tokens(j) for j in picks], self.world_size)
        return [[picks[i] for i in positions] for positions in dealt]

    def step_batches(self, epoch: int, step_in_epoch: int) -> list[dict]:
        """This rank's ``accumulation`` micro-batches of optimizer step ``step_in_epoch`` of ``epoch``."""
        mine = self.step_sequences(epoch, step_in_epoch)[self.rank]
        m = self.micro_batch_size
        return [self.collator([self.sequences.get(j) for j in mine[k * m:(k + 1) * m]])
                for k in range(self.accumulation)]

    def _order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_order = epoch_order(len(self.sequences), self.seed, epoch)
            self._cached_epoch = epoch
        return self._cached_order


def eval_batches(sequences: RankSequences, collator: Collator, micro_batch_size: int,
                 max_batches: int | None) -> Iterator[dict]:
    """Evaluation micro-batches in stored order; wrap-around repeats carry no labels (counted once).

    Every rank yields the same number of batches (each has the same number of sequences), which ZeRO-3
    needs: each forward gathers parameters from all ranks.
    """
    count = -(-len(sequences) // micro_batch_size)
    if max_batches is not None:
        count = min(count, max_batches)
    for b in range(count):
        idx = range(b * micro_batch_size, min(len(sequences), (b + 1) * micro_batch_size))
        yield collator([sequences.get(j) for j in idx], drop_labels=[sequences.is_repeat(j) for j in idx])


def first_sequences(data_dir: str | Path, manifest: dict, split: str, count: int) -> list[dict[str, np.ndarray]]:
    """The first ``count`` sequences of ``split`` in stored order (the same on every rank)."""
    whole = RankSequences.open(data_dir, manifest, split, rank=0, world_size=1)
    return [whole.get(j) for j in range(min(count, len(whole)))]
