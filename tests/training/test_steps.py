"""Batch and step arithmetic (training/steps.py): one answer for plan, launch, slurm and the driver."""

from __future__ import annotations

import json

import pytest

from training.config import TrainConfig
from training.data import Collator, RankSequences, TrainBatches
from training.steps import BatchError, plan_steps, resolve_batch, resolved_train


def test_without_a_global_batch_micro_and_accumulation_are_kept():
    assert resolve_batch(2, 3, None, 5) == (2, 3)


@pytest.mark.parametrize("micro,accum,world,expected", [
    (4, 2, 2, (4, 2)),   # as configured
    (4, 2, 1, (4, 4)),   # fewer ranks: more accumulation
    (4, 2, 4, (4, 1)),   # more ranks: less accumulation
    (4, 2, 8, (2, 1)),   # and then a smaller micro-batch
    (3, 1, 2, (2, 4)),   # 8 per rank: the largest micro-batch <= 3 that divides it
])
def test_a_global_batch_is_kept_on_every_world_size_that_divides_it(micro, accum, world, expected):
    assert resolve_batch(micro, accum, 16, world) == expected
    m, a = expected
    assert m * a * world == 16 and m <= micro


def test_an_impossible_global_batch_is_one_error_with_the_arithmetic_and_what_works():
    with pytest.raises(BatchError) as err:
        resolve_batch(2, 2, 16, 3)
    text = str(err.value)
    assert "16 / 3 = 5.33333 sequences per rank" in text
    assert "train.global_batch_size 15 or 18" in text and "(1, 2, 4)" in text


def test_config_validate_reports_it_with_the_other_problems():
    from training.config import ConfigError, config_from_dict

    cfg = config_from_dict({"output_dir": "o", "model": {"name_or_path": "m"}, "data": {"sources": ["x"]},
                            "train": {"global_batch_size": 16, "micro_batch_size": 2}})
    cfg.train.lr = -1.0
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=3)
    assert "cannot be split over 3 data-parallel ranks" in str(err.value) and "train.lr" in str(err.value)
    cfg.train.lr = 1e-5
    cfg.validate(world_size=4)  # 16 = 2 x 2 x 4: adapts, no error


def test_resolved_train_carries_the_adapted_numbers():
    t = resolved_train(TrainConfig(micro_batch_size=4, gradient_accumulation_steps=2, global_batch_size=16), 1)
    assert (t.micro_batch_size, t.gradient_accumulation_steps, t.global_batch_size) == (4, 4, 16)


class _Sequences(RankSequences):
    def supervised_tokens(self, j):
        return 1


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("train", [TrainConfig(epochs=3, micro_batch_size=2, gradient_accumulation_steps=3),
                                   TrainConfig(epochs=2, micro_batch_size=4, global_batch_size=16),
                                   TrainConfig(max_steps=7, micro_batch_size=1, gradient_accumulation_steps=2)])
def test_plan_launch_and_the_driver_agree_on_the_steps(tmp_path, world, train):
    """`zerotune plan`, `zerotune launch`'s steps line, train.py's LR-schedule steps and the driver's data
    (steps per epoch of its TrainBatches) give one answer."""
    from launcher.launch_cli import steps_line
    from launcher.plan import batch_arithmetic
    from launcher.plan import ModelShape
    from training.config import config_from_dict
    from training.train import _total_steps

    counts = [61, 40, 2]
    manifest = {"splits": {"train": {"sequences": sum(counts), "tokens": 100 * sum(counts),
                                     "shards": [{"name": f"s{i}", "sequences": n} for i, n in enumerate(counts)]}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cfg = config_from_dict({"output_dir": str(tmp_path / "o"), "model": {"name_or_path": "m"},
                            "data": {"sources": ["x"], "output_dir": str(tmp_path)}})
    cfg.train = train
    shape = ModelShape(params=10, largest_layer_params=10, num_layers=1, hidden_size=4, num_heads=1, vocab_size=8,
                       model_type="llama")
    planned = batch_arithmetic(cfg, world, shape, peak_tflops=1.0, mfu=0.5)
    cfg.train = resolved_train(train, world)
    run_total = _total_steps(cfg, manifest, world)
    data = TrainBatches(_Sequences(tmp_path, "train", [("s", 0, sum(counts))], sum(counts)), Collator(0),
                        cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, world, 0, seed=0)
    plan = plan_steps(train, sum(counts), world)
    assert planned["total_steps"] == run_total == plan.total_steps
    assert planned["steps_per_epoch"] == data.steps_per_epoch == plan.steps_per_epoch
    if train.max_steps is None:
        assert run_total == train.epochs * data.steps_per_epoch
    assert f"{plan.steps_per_epoch} steps per epoch; {run_total} steps in total" in steps_line(cfg, manifest, world)
