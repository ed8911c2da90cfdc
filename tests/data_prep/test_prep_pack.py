import numpy as np
import pytest

from data_prep.pack import assign_to_shards, no_packing, pack_best_fit, packing_efficiency


def _check_bins(bins, lengths, seq_len):
    placed = sorted(d for b in bins for d in b)
    assert placed == list(range(len(lengths))), "every document exactly once"
    assert all(sum(lengths[d] for d in b) <= seq_len for b in bins)


def test_best_fit_decreasing_known_case():
    # BFD: 7 -> new, 6 -> new, 4 -> fits with 6 (room 4, exact), 3 -> with 7 (room 3, exact).
    lengths = np.array([3, 7, 4, 6])
    bins = pack_best_fit(lengths, 10)
    _check_bins(bins, lengths, 10)
    assert sorted(sorted(lengths[b].tolist()) for b in bins) == [[3, 7], [4, 6]]


def test_best_fit_picks_tightest_room():
    # After 9 and 6 open (rooms 1 and 4), a 1 must go into the 9's sequence, a 4 into the 6's.
    lengths = np.array([9, 6, 4, 1])
    bins = pack_best_fit(lengths, 10)
    assert len(bins) == 2 and sorted(sorted(lengths[b].tolist()) for b in bins) == [[1, 9], [4, 6]]


def test_random_lengths_pack_tightly_and_deterministically():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 300, size=2000)
    bins = pack_best_fit(lengths, 512)
    _check_bins(bins, lengths, 512)
    assert packing_efficiency(int(lengths.sum()), len(bins), 512) > 0.97
    assert bins == pack_best_fit(lengths, 512)


def test_too_long_document_is_refused():
    with pytest.raises(ValueError):
        pack_best_fit(np.array([5, 11]), 10)


def test_no_packing_and_shards():
    assert no_packing(3) == [[0], [1], [2]]
    assert assign_to_shards(5, 2) == [[0, 2, 4], [1, 3]]
    assert assign_to_shards(1, 4) == [[0]]
    assert assign_to_shards(0, 4) == []
    assert packing_efficiency(0, 0, 10) == 0.0
