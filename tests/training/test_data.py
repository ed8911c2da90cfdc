"""Rank assignment, epoch order, collator and evaluation batches of training/data.py."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import (Collator, RankSequences, TrainBatches, assign_sequences, deal_step, epoch_order,
                           eval_batches)


def _manifest(counts: list[int], split: str = "train") -> dict:
    shards = [{"name": f"shard-{i:05d}", "sequences": n} for i, n in enumerate(counts)]
    return {"splits": {split: {"sequences": sum(counts), "shards": shards}}}


def _flatten(ranges):
    return [(name, i) for name, lo, hi in ranges for i in range(lo, hi)]


@pytest.mark.parametrize("counts,world", [([5, 3, 4], 2), ([5, 3, 4], 5), ([1], 3), ([7, 0, 2], 4), ([4, 4], 8)])
def test_assign_sequences_equal_counts_cover_everything_and_wrap(counts, world):
    per_rank = assign_sequences(_manifest(counts), "train", world)
    flat = [_flatten(r) for r in per_rank]
    total = sum(counts)
    assert len({len(f) for f in flat}) == 1, "every rank must get the same number of sequences"
    assert len(flat[0]) == -(-total // world)
    every = [item for f in flat for item in f]
    expected = [(f"shard-{k:05d}", i) for k, n in enumerate(counts) for i in range(n)]
    assert sorted(set(every)) == sorted(expected)
    # Wrap-around: the padding repeats the first sequences, in order.
    assert every[total:] == [expected[i % total] for i in range(total, len(every))]


def test_assign_sequences_is_deterministic_and_contiguous():
    m = _manifest([5, 3, 4])
    assert assign_sequences(m, "train", 2) == assign_sequences(m, "train", 2)
    assert assign_sequences(m, "train", 2)[0] == [("shard-00000", 0, 5), ("shard-00001", 0, 1)]
    assert assign_sequences(m, "validation", 2) == [[], []]


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = epoch_order(50, seed=1, epoch=0)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, epoch_order(50, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_order(50, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_order(50, seed=2, epoch=0))


def _seq(ids, labels, pos):
    return {"input_ids": np.array(ids, np.int32), "labels": np.array(labels, np.int32),
            "position_ids": np.array(pos, np.int32)}


def test_collator_pads_to_batch_max_or_fixed_length():
    seqs = [_seq([5, 6, 7], [-100, 6, 7], [0, 1, 0]), _seq([8], [-100], [0])]
    batch = Collator(pad_token_id=2)(seqs)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 0]]
    fixed = Collator(pad_token_id=2, pad_to_tokens=6)(seqs)
    assert fixed["input_ids"].shape == (2, 6)
    dropped = Collator(pad_token_id=2)(seqs, drop_labels=[True, False])
    assert dropped["labels"][0].tolist() == [-100, -100, -100]


class _FakeSequences(RankSequences):
    """Sequence j holds tokens [j + 10] * (length(j) + 1), the first unsupervised; lengths from ``lengths``
    (default: 1 supervised token each)."""

    lengths: list[int] | None = None

    def get(self, j):
        n = 1 if self.lengths is None else self.lengths[j]
        return _seq([j + 10] * (n + 1), [-100] + [j + 20] * n, list(range(n + 1)))

    def supervised_tokens(self, j):
        return 1 if self.lengths is None else self.lengths[j]


def _fake(n, first_repeat=None, lengths=None):
    seqs = _FakeSequences(data_dir=None, split="train", ranges=[("s", 0, n)],
                          first_repeat=n if first_repeat is None else first_repeat)
    seqs.lengths = lengths
    return seqs


def test_rank_sequences_locate_and_repeats():
    m = _manifest([5, 3, 4])
    last = RankSequences.open("unused", m, "train", rank=4, world_size=5)  # 3 per rank; rank 4 gets 12, 13, 14
    assert len(last) == 3 and last.first_repeat == 0
    assert [last.locate(j) for j in range(3)] == [("shard-00000", 0), ("shard-00000", 1), ("shard-00000", 2)]
    third = RankSequences.open("unused", m, "train", rank=3, world_size=5)  # 9, 10, 11: no repeats
    assert third.first_repeat == 3 and third.locate(0) == ("shard-00002", 1)
    both = RankSequences.open("unused", _manifest([5]), "train", rank=1, world_size=2)  # 3, 4, then 0 again
    assert [both.is_repeat(j) for j in range(3)] == [False, False, True]


def test_train_batches_jump_to_a_position_without_replay():
    batches = TrainBatches(_fake(13), Collator(0), micro_batch_size=2, accumulation=3, world_size=1, rank=0,
                           seed=0)
    assert batches.steps_per_epoch == 2  # 13 // 6; the partial step is dropped
    order = epoch_order(13, 0, 1)
    step = batches.step_batches(epoch=1, step_in_epoch=1)
    assert len(step) == 3
    got = [int(x) - 10 for b in step for x in b["input_ids"][:, 0]]
    assert got == [int(j) for j in order[6:12]]  # equal token counts: dealt in order


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6])
def test_a_step_takes_the_same_sequences_on_every_world_size(world):
    """The global order: step s of an epoch is sequences [s * G, (s + 1) * G) of the epoch's permutation,
    whatever the world size; ranks share them out exactly, each with micro x accumulation of them."""
    lengths = [(7 * j) % 23 + 1 for j in range(40)]
    per_rank = 12 // world
    micro = 2 if per_rank % 2 == 0 else 1
    ranks = [TrainBatches(_fake(40, lengths=lengths), Collator(0), micro, per_rank // micro, world, r, seed=3)
             for r in range(world)]
    assert {b.global_batch_size for b in ranks} == {12} and ranks[0].steps_per_epoch == 3
    for epoch, step in ((0, 0), (1, 2)):
        shares = [[int(x) - 10 for mb in b.step_batches(epoch, step) for x in mb["input_ids"][:, 0]]
                  for b in ranks]
        assert [len(s) for s in shares] == [per_rank] * world
        expected = epoch_order(40, 3, epoch)[step * 12:(step + 1) * 12]
        assert sorted(j for s in shares for j in s) == sorted(expected.tolist())
        supervised = [sum(lengths[j] for j in s) for s in shares]
        assert max(supervised) - min(supervised) <= max(lengths)


def test_deal_step_balances_tokens_where_blocks_do_not():
    """Token counts sorted the way packed bins come out (longest first): contiguous blocks give the first
    rank all the large ones; dealing largest-first to the emptiest rank evens them out."""
    lengths = sorted(((j * 37) % 200 + 50 for j in range(64)), reverse=True)
    dealt = deal_step(lengths, 4)
    assert sorted(i for r in dealt for i in r) == list(range(64)) and {len(r) for r in dealt} == {16}
    sums = [sum(lengths[i] for i in r) for r in dealt]
    blocks = [sum(lengths[16 * r:16 * (r + 1)]) for r in range(4)]
    assert max(sums) - min(sums) <= max(lengths)  # the greedy bound, far below the blocks' spread
    assert max(blocks) / min(blocks) > 2 and max(sums) / min(sums) < 1.02
    with pytest.raises(ValueError, match="cannot be dealt equally"):
        deal_step(lengths[:10], 4)


def test_eval_batches_give_repeats_no_labels_and_respect_max_batches():
    seqs = _fake(5, first_repeat=3)
    batches = list(eval_batches(seqs, Collator(0), micro_batch_size=2, max_batches=None))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    scored = [int((b["labels"] != -100).sum()) for b in batches]
    assert scored == [2, 1, 0]
    assert len(list(eval_batches(seqs, Collator(0), micro_batch_size=2, max_batches=1))) == 1
