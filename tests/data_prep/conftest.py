"""Fixtures for the data_prep tests: a DataConfig factory and a small Q&A CSV."""

from __future__ import annotations

from pathlib import Path

import pytest
from prep_data import qa_rows, write_csv

from data_prep.config import DataConfig


@pytest.fixture()
def make_cfg(tmp_path):
    """DataConfig factory with the test columns and a private output folder."""

    def make(sources, **overrides) -> DataConfig:
        base = {"sources": [str(s) for s in sources], "output_dir": str(tmp_path / "prepared"), "seq_len": 256,
                "prompt_column": "question", "response_column": "answer", "num_shards": 2,
                "validation_fraction": 0.1, "test_fraction": 0.1}
        base.update(overrides)
        return DataConfig(**base)

    return make


@pytest.fixture()
def qa_csv(tmp_path) -> Path:
    """200 distinct Q&A rows as CSV."""
    return write_csv(tmp_path / "qa.csv", qa_rows(200))
