"""Metrics output: JSONL and TensorBoard records, MFU arithmetic, memory reading."""

from __future__ import annotations

import json

import pytest
import numpy as np
import torch

from training.tb import (MetricsLogger, memory_gb, peak_flops_per_device, perplexity, squared_document_tokens,
                         training_flops)


def test_logger_writes_jsonl_and_tensorboard_on_rank0_only(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(str(tmp_path / "tb"), tmp_path / "metrics.jsonl", enabled=True)
    log.scalars(3, {"train/loss": 2.5, "train/mfu": None})
    log.text("config", "hello", 0)
    log.line("step 3")
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"kind": "train", "step": 3, "train/loss": 2.5}
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["train/loss"]  # None is not logged
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(3, 2.5)]
    assert capsys.readouterr().out == "step 3\n"
    off = MetricsLogger(str(tmp_path / "tb1"), tmp_path / "m1.jsonl", enabled=False)
    off.scalars(1, {"train/loss": 1.0})
    off.close()
    assert not (tmp_path / "m1.jsonl").exists() and not (tmp_path / "tb1").exists()


def test_training_flops_count_attention_per_document():
    """Two rows of 16: documents 3 + 5 (then 8 padding) and 16: attention is 3^2 + 5^2 + 16^2 pairs, not 2 x 16^2."""
    from training.data import Collator

    seqs = [{"input_ids": np.arange(8), "labels": np.arange(8), "position_ids": np.r_[np.arange(3), np.arange(5)]},
            {"input_ids": np.arange(16), "labels": np.arange(16), "position_ids": np.arange(16)}]
    batch = Collator(0, pad_to_tokens=16)(seqs)
    squares = squared_document_tokens(batch["cu_seqlens"])
    assert squares == 9 + 25 + 256
    assert training_flops(1_000_000, num_layers=2, hidden_size=64, tokens=24, squared_document_tokens_sum=squares) \
        == 6 * 1_000_000 * 24 + 12 * 2 * 64 * (9 + 25 + 256)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_no_mfu_peak_and_resident_memory_on_cpu():
    assert peak_flops_per_device("bf16") is None
    assert 0.01 < memory_gb() < 1024


def test_perplexity():
    assert perplexity(0.0) == 1.0 and perplexity(1000.0) == float("inf")
