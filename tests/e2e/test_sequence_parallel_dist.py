"""train.sequence_parallel_size 2 on 2 gloo ranks through the real `deepspeed` launcher, against the same global
batch on one rank: the whole loss curve under ZeRO-2 and ZeRO-3 (with activation checkpointing), and an exact
resume.

Both ranks of the group read the one data-parallel rank's micro-batches (micro 2 x accumulation 2), exactly
what the single rank reads, so the runs differ only in where each token's work is done: fp32, losses within
1e-5 per step. The tiny model has 4 attention heads and 2 KV heads (both divisible by 2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_train_dist import (HALF, STEPS, _copy_until_half, check, deepspeed_bin, launch,  # noqa: F401
                                       prepared, run_config, run_two_rank_script, train_losses)

pytestmark = pytest.mark.dist
ZERO_WRITER = Path(__file__).resolve().parents[1] / "training" / "sp_zero_writer.py"
TOLERANCE = 1e-5  # fp32; the split changes only the order of sums (measured ~1e-7 on the first step)


@pytest.fixture(scope="module")
def sp_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's tokenizer with a random-init Llama of 4 heads and 2 KV heads (head_dim 16)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("sp-model") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = AutoConfig.from_pretrained(out)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, config.hidden_size // 4
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def _config(model_dir: Path, data_dir: Path, out: Path, stage: int, sequence_parallel: int) -> dict:
    # The ZeRO-3 split run also checkpoints every layer: its backward recomputes the forward's all-to-alls.
    checkpointing = "full" if stage == 3 and sequence_parallel > 1 else "none"
    return run_config(model_dir, data_dir, out, stage,
                      train={"sequence_parallel_size": sequence_parallel},
                      model={"attn_implementation": "sdpa", "gradient_checkpointing": checkpointing},
                      eval={"sample_generations": 0})


@pytest.fixture(scope="module")
def runs(deepspeed_bin, sp_model_dir, prepared, tmp_path_factory):
    """``runs(ranks, stage)``: a finished 12-step run dir (SP = ranks), each launched once."""
    done: dict[tuple[int, int], Path] = {}
    root = tmp_path_factory.mktemp("sp-runs")

    def get(ranks: int, stage: int) -> Path:
        if (ranks, stage) not in done:
            out = root / f"sp{ranks}-stage{stage}"
            check(launch(deepspeed_bin, _config(sp_model_dir, prepared, out, stage, ranks), ranks=ranks))
            done[ranks, stage] = out
        return done[ranks, stage]
    return get


@pytest.mark.parametrize("stage", [2, 3])
def test_sequence_parallel_2_matches_one_rank_per_step(runs, stage):
    one, split = train_losses(runs(1, 2)), train_losses(runs(2, stage))
    assert sorted(one) == sorted(split) == list(range(1, STEPS + 1))
    assert one[STEPS] < one[1] - 0.1  # it trains
    for step in one:
        assert abs(split[step] - one[step]) < TOLERANCE, f"step {step}: {split[step]} vs {one[step]}"


def test_sequence_parallel_run_records_its_size(runs):
    run = runs(2, 3)
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["sequence_parallel_size"] == 2 and ds["train_batch_size"] == 2 * 2 * 1
    state = json.loads((run / "checkpoints" / f"step-{STEPS:08d}" / "zerotune_state.json").read_text())
    assert state["sequence_parallel_size"] == 2 and state["global_batch_size"] == 4


def test_sequence_parallel_resume_is_exact(deepspeed_bin, runs, tmp_path):
    ref = runs(2, 3)
    run = _copy_until_half(ref, tmp_path / "run", latest=f"step-{HALF:08d}")
    cfg = {**yaml.safe_load((ref.parent / f"{ref.name}.yaml").read_text()), "output_dir": str(run)}
    proc = check(launch(deepspeed_bin, cfg, ranks=2))
    assert f"resumed from step-{HALF:08d}" in proc.stdout and "sequence parallel: groups of 2 ranks" in proc.stdout
    want, got = train_losses(ref), train_losses(run)
    assert min(got) == HALF + 1
    for step in range(HALF + 1, STEPS + 1):
        assert got[step] == want[step], f"step {step}: {got[step]!r} != {want[step]!r}"


def test_first_step_gradients_under_zero2_and_zero3_equal_the_whole_row_on_one_process(deepspeed_bin, tmp_path):
    """The gradient ZeRO-2 and ZeRO-3 apply with the micro-batch split over the group (recovered from one SGD
    step at lr 1000, see the writer) against the whole micro-batch's gradient on one process without
    DeepSpeed; the two halves carry unequal numbers of supervised tokens. fp32, 1e-5 per element: only the
    order of sums differs (the in-process comparison measures ~5e-8)."""
    import torch

    out = tmp_path / "grads.pt"
    run_two_rank_script(deepspeed_bin, ZERO_WRITER, "--out", str(out))
    results = torch.load(out)
    reference = results["reference"]
    assert max(float(g.abs().max()) for g in reference.values()) > 1e-3  # gradients large against the tolerance
    for stage in (2, 3):
        for name, want in reference.items():
            diff = float((results[f"stage{stage}"][name] - want).abs().max())
            assert diff <= 1e-5, (stage, name, diff)
