"""What a checkpoint must agree with to be resumed (training.resume.check_resumable), without processes.

The dist tests resume real checkpoints through these checks; here each refusal and warning is pinned on
a saved state as zerotune_state.json holds it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from training.checkpoint import ResumeError
from training.resume import RunIdentity, check_resumable

FOLDER = Path("/runs/a/checkpoints/step-00000006")
RUN = RunIdentity(world_size=2, global_batch_size=8, micro_batch_size=2, accumulation=2, optimizer_param_groups=1,
                  weight_decay=0.0, manifest_cache_key="data-1", config_hash="cfg-1")


def saved_state(**over) -> dict:
    """zerotune_state.json of a step-6 checkpoint saved by RUN, mid-epoch (step 6 of epoch 0)."""
    state = {"step": 6, "epoch": 0, "data_position": {"epoch": 0, "step_in_epoch": 6}, "world_size": 2,
             "config_hash": "cfg-1", "manifest_cache_key": "data-1", "global_batch_size": 8,
             "sequences_consumed_in_epoch": 48, "optimizer_param_groups": 1, "weight_decay": 0.0}
    state.update(over)
    return state


def before_the_global_order(**over) -> dict:
    """The same checkpoint as written before the global data order: no position in sequences, no batch."""
    state = saved_state(**over)
    del state["sequences_consumed_in_epoch"], state["global_batch_size"]
    return state


def test_a_matching_checkpoint_resumes_without_a_word():
    assert check_resumable(FOLDER, saved_state(), RUN) == []
    assert check_resumable(FOLDER, saved_state(world_size=1), RUN) == []  # same global batch, 1 -> 2 ranks


def test_a_changed_config_is_one_warning():
    assert check_resumable(FOLDER, saved_state(config_hash="cfg-0"), RUN) == [
        "the config differs from the one step-00000006 was saved with; continuing with the new one"]


def test_another_global_batch_on_another_world_size_is_refused_with_the_arithmetic():
    with pytest.raises(ResumeError, match=r"saved on 1 data-parallel ranks with global batch 4, but this run has 2 "
                                          r"ranks x micro 2 x accumulation 2 = 8; set train.global_batch_size: 4"):
        check_resumable(FOLDER, saved_state(world_size=1, global_batch_size=4), RUN)


def test_old_order_checkpoint_on_the_same_world_size_resumes_with_one_warning_saying_what_it_costs():
    warnings = check_resumable(FOLDER, before_the_global_order(), RUN)
    assert len(warnings) == 1
    assert warnings[0].startswith("step-00000006 was saved before the global data order (zerotune_state.json has "
                                  "no sequences_consumed_in_epoch): the rest of epoch 0 (from step 6 of it) "
                                  "follows the new order")
    assert "Start a new output_dir to avoid it" in warnings[0]


def test_old_order_checkpoint_at_an_epoch_boundary_says_nothing_is_repeated():
    state = before_the_global_order(epoch=1, data_position={"epoch": 1, "step_in_epoch": 0})
    (warning,) = check_resumable(FOLDER, state, RUN)
    assert "at the start of epoch 1: no sequence is repeated or skipped" in warning


def test_old_order_checkpoint_on_another_world_size_is_refused_naming_it_and_the_fix():
    with pytest.raises(ResumeError) as err:
        check_resumable(FOLDER, before_the_global_order(world_size=4), RUN)
    assert str(err.value) == (
        f"{FOLDER} was saved on 4 data-parallel ranks before zerotune recorded a data position independent of the "
        f"world size (no sequences_consumed_in_epoch in zerotune_state.json), so it cannot resume on 2; resume it "
        f"on 4 ranks until its next checkpoint (which records the position), or start a new output_dir")


def test_another_param_group_layout_and_other_data_are_refused():
    with pytest.raises(ResumeError, match="holds optimizer state for 2 parameter group"):
        check_resumable(FOLDER, saved_state(optimizer_param_groups=2, weight_decay=0.1), RUN)
    with pytest.raises(ResumeError, match="trained on different prepared data"):
        check_resumable(FOLDER, saved_state(manifest_cache_key="data-0"), RUN)
