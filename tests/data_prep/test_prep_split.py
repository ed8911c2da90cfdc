import numpy as np

from data_prep.clean import hash64
from data_prep.split import assign_splits, cross_split_overlap


def _hashes(n, start=0):
    return np.array([hash64(f"row {i}") for i in range(start, start + n)], dtype=np.int64)


def test_fractions_are_respected_roughly():
    ids = assign_splits(_hashes(20_000), 0.1, 0.05)
    assert abs((ids == 1).mean() - 0.1) < 0.01
    assert abs((ids == 2).mean() - 0.05) < 0.01


def test_assignment_depends_only_on_content():
    base = assign_splits(_hashes(1000), 0.1, 0.1)
    grown = assign_splits(np.concatenate([_hashes(500, start=5000), _hashes(1000)]), 0.1, 0.1)
    assert np.array_equal(base, grown[500:]), "adding rows must not move earlier ones"


def test_zero_fractions_put_everything_in_train():
    assert (assign_splits(_hashes(100), 0.0, 0.0) == 0).all()


def test_overlap_counts_shared_prompts_and_ignores_text_rows():
    prompts = np.array([1, 1, 2, 3, 3, 0, 0])
    splits = np.array([0, 2, 0, 0, 1, 0, 2])
    assert cross_split_overlap(prompts, splits) == {"train/validation": 1, "train/test": 1, "validation/test": 0}
