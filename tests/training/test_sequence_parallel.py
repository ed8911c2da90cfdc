"""Sequence parallelism: how a packed row is split, what is refused, and (2 gloo ranks) that the split row
gives the loss and gradients of the whole row on one rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import Collator
from training.model import IGNORE_INDEX, flatten_batch
from training.sequence_parallel import (SequenceParallelError, check_model, local_supervised_tokens, shard_flat,
                                        size_problems)
from training.steps import BatchError, data_parallel_size, plan_steps

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("sequence_parallel_worker.py")
# fp32 on both sides; the split row adds the same per-token terms in another order (and sums two ranks'
# partial gradients): differences are rounding, ~1e-7 here.
TOLERANCE = 1e-5


def _batch(rows: list[list[int]]) -> dict:
    seqs = []
    start = 10
    for lengths in rows:
        ids = np.arange(start, start + sum(lengths))
        start += sum(lengths)
        pos = np.concatenate([np.arange(n) for n in lengths])
        seqs.append({"input_ids": ids, "labels": np.where(pos == 0, -100, ids), "position_ids": pos})
    return Collator(pad_token_id=0)(seqs)


def test_split_shifts_targets_before_cutting_and_pads_with_its_own_document():
    batch = _batch([[3, 4], [2]])  # 9 real tokens over 3 ranks: 3 each, no padding; over 2: one pad token
    flat = flatten_batch(batch)
    slices = [shard_flat(flat, 2, r) for r in range(2)]
    assert [s["input_ids"].shape[1] for s in slices] == [5, 5]
    # the last token of slice 0 predicts the first token of slice 1 (same document: ids 14 -> 15)
    assert int(slices[0]["input_ids"][0, -1]) == 14 and int(slices[0]["targets"][-1]) == 15
    assert slices[1]["targets"][-1] == IGNORE_INDEX and slices[1]["position_ids"][0, -1] == 0
    assert slices[0]["cu_seqlens"].tolist() == [0, 3, 7, 9, 10]  # the pad token is a document of its own
    whole = torch.cat([s["targets"] for s in slices])[:9]
    assert torch.equal(whole, flat["targets"])
    assert torch.equal(torch.cat([s["position_ids"] for s in slices], dim=1)[:, :9], flat["position_ids"])


def test_local_counts_add_up_to_the_micro_batch_count():
    batch = _batch([[5, 6, 1], [7, 2]])
    whole = int((flatten_batch(batch)["targets"] != IGNORE_INDEX).sum())
    for size in (1, 2, 3, 4):
        assert sum(local_supervised_tokens(batch, size, r) for r in range(size)) == whole


def test_sizes_that_do_not_divide_world_or_heads_are_named():
    assert size_problems(2, 4, 8, 2) == []
    problems = size_problems(3, 4, 8, 2)
    assert len(problems) == 3
    assert "train.sequence_parallel_size 3 does not divide the world size 4" in problems[0]
    assert "8 attention heads" in problems[1] and "2 KV heads" in problems[2]


def test_check_model_refuses_kv_heads_and_unwrapped_kernels():
    from transformers import LlamaConfig

    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=1)
    with pytest.raises(SequenceParallelError, match="train.sequence_parallel_size 2 does not divide the model's 1 KV"):
        check_model(2, config, "sdpa")
    with pytest.raises(SequenceParallelError, match="'eager'"):
        check_model(2, LlamaConfig(num_attention_heads=4, num_key_value_heads=2), "eager")
    check_model(1, config, "eager")  # off: nothing to check


def test_steps_count_data_parallel_ranks():
    from training.config import TrainConfig

    train = TrainConfig(micro_batch_size=2, gradient_accumulation_steps=3, sequence_parallel_size=2)
    plan = plan_steps(train, train_sequences=120, world_size=4)
    assert (plan.world_size, plan.global_batch_size, plan.steps_per_epoch) == (2, 12, 10)
    with pytest.raises(BatchError, match="sequence_parallel_size 3 does not divide the world size 4"):
        data_parallel_size(4, 3)


def test_config_validation_names_the_key_before_any_process_group():
    from training.config import ConfigError, RunConfig

    cfg = RunConfig()
    cfg.train.sequence_parallel_size = 3
    with pytest.raises(ConfigError, match="sequence_parallel_size 3 does not divide the world size 4"):
        cfg.validate(world_size=4)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> dict:
    """One 2-rank worker run shared by the equivalence, weighting and control tests (~15 s)."""
    out = tmp_path_factory.mktemp("sp") / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.dist
@pytest.mark.parametrize("chunk", [0, 16])
@pytest.mark.parametrize("case", ["packed", "skewed"])
def test_split_row_equals_whole_row_on_one_rank(two_rank_results, case, chunk):
    """Loss and every parameter's gradient, plain and chunked loss, within 1e-5 (fp32)."""
    r = two_rank_results[f"{case}/chunk{chunk}"]
    assert abs(r["loss"] - r["reference_loss"]) < TOLERANCE
    assert r["grad_max_diff"] < TOLERANCE < r["grad_max"]


@pytest.mark.dist
def test_uneven_supervised_halves_are_weighted_per_token(two_rank_results):
    """Slice 0 scores 1 token, slice 1 scores 27: the mean of per-rank means is far off, ours is not."""
    assert two_rank_results["skewed_counts"] == [1, 27]
    r = two_rank_results["skewed/chunk0"]
    assert abs(r["naive_loss"] - r["reference_loss"]) > 100 * TOLERANCE
    assert abs(r["loss"] - r["reference_loss"]) < TOLERANCE


@pytest.mark.dist
def test_control_dropping_document_bounds_after_the_split_leaks(two_rank_results):
    """The equivalence test would catch a split that lets documents see each other across it."""
    r = two_rank_results["control"]
    assert abs(r["loss"] - r["reference_loss"]) > 100 * TOLERANCE


def test_resume_with_another_size_needs_the_same_global_batch(tmp_path):
    from training.checkpoint import ResumeError
    from training.sequence_parallel import check_resume_size

    state = {"sequence_parallel_size": 2, "global_batch_size": 8}
    check_resume_size(tmp_path, state, 2, 8)
    check_resume_size(tmp_path, state, 1, 8)  # same global batch: the data position keeps its meaning
    with pytest.raises(ResumeError, match="saved with train.sequence_parallel_size 2 and global batch 8, but this "
                                          "run has train.sequence_parallel_size 1 and global batch 16"):
        check_resume_size(tmp_path, state, 1, 16)
    check_resume_size(tmp_path, {"global_batch_size": 8}, 1, 16)  # saved before SP existed, size 1 both times


def test_train_refuses_a_size_that_does_not_divide_the_models_kv_heads(tiny_model_dir):
    """Checked by training.train.validate_inputs from config.json, before any process group starts."""
    from training.config import RunConfig
    from training.train import check_sequence_parallel

    cfg = RunConfig()
    cfg.model.name_or_path = str(tiny_model_dir)  # 2 attention heads, 1 KV head
    cfg.train.sequence_parallel_size = 2
    with pytest.raises(SequenceParallelError, match="sequence_parallel_size 2 does not divide the model's 1 KV heads"):
        check_sequence_parallel(cfg, "sdpa")
    assert getattr(SequenceParallelError, "user_error", False)  # train.main prints it as one line, exit 2
