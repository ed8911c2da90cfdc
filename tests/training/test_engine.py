"""ds_config resolution against the YAML, and the LR schedule."""

from __future__ import annotations

import json
import math

import pytest
import torch

from training.config import DS_CONFIG_DIR, ConfigError, DeepSpeedSection, TrainConfig
from training.engine import lr_multiplier, resolve_ds_config, zero_stage


def _train(**kw) -> TrainConfig:
    base = dict(micro_batch_size=2, gradient_accumulation_steps=4, precision="fp32", grad_clip=0.5)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("path", sorted(DS_CONFIG_DIR.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_ds_config_resolves(path):
    cfg = resolve_ds_config(_train(), DeepSpeedSection(config=path.name), path, world_size=8)
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 2 * 4 * 8
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(cfg)
    assert "optimizer" not in cfg and "scheduler" not in cfg
    if "offload" in path.name and not torch.cuda.is_available():
        assert cfg["zero_force_ds_cpu_optimizer"] is False  # torch AdamW is accepted with offload on CPU


def test_precision_and_stage_override(tmp_path):
    path = DS_CONFIG_DIR / "zero2.json"
    cfg = resolve_ds_config(_train(precision="bf16"), DeepSpeedSection(zero_stage=3), path, world_size=2)
    assert cfg["bf16"]["enabled"] is True and zero_stage(cfg) == 3
    assert zero_stage(resolve_ds_config(_train(), DeepSpeedSection(), path, 2)) == 2


def test_hand_set_contradiction_names_both(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.5,
                                "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                                "optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}))
    with pytest.raises(ConfigError) as exc:
        resolve_ds_config(_train(), DeepSpeedSection(), path, world_size=2)
    text = str(exc.value)
    assert "train_micro_batch_size_per_gpu = 8" in text and "train.micro_batch_size = 2" in text
    assert "bf16.enabled" in text and "train.precision" in text
    assert "optimizer.params.lr" in text and "train.lr" in text
    assert "gradient_clipping" not in text  # agrees with the YAML


def test_another_optimizer_type_is_refused(tmp_path):
    path = tmp_path / "sgd.json"
    path.write_text(json.dumps({"optimizer": {"type": "SGD", "params": {"lr": "auto"}}}))
    with pytest.raises(ConfigError, match="optimizer.type = 'SGD'"):
        resolve_ds_config(_train(), DeepSpeedSection(), path, world_size=2)


def test_stage_auto_says_to_use_the_launcher():
    with pytest.raises(ConfigError, match="zerotune launch"):
        resolve_ds_config(_train(), DeepSpeedSection(zero_stage="auto"), DS_CONFIG_DIR / "zero2.json", 2)


def test_lr_schedule_shapes():
    cos = [lr_multiplier(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert cos[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in zip(cos[1:], cos[2:]))
    assert math.isclose(cos[-1], 0.1)
    lin = [lr_multiplier(s, 10, 0, "linear", 0.0) for s in range(10)]
    assert math.isclose(lin[0], 1.0) and math.isclose(lin[-1], 0.0)
    assert math.isclose(lin[4] - lin[5], lin[5] - lin[6])
    assert [lr_multiplier(s, 10, 3, "constant", 0.1) for s in (0, 5, 9)] == [1 / 3, 1.0, 1.0]


def _small_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))
    model[2].weight.requires_grad_(False)  # frozen: in no group
    return model


def test_no_weight_decay_is_one_param_group():
    from training.engine import build_optimizer

    model = _small_model()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.0), {})
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters() if p.requires_grad}


def test_weight_decay_spares_biases_and_norms():
    from training.engine import build_optimizer

    model = _small_model()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), {})
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(model[0].weight)]
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


def test_resuming_a_two_group_checkpoint_keeps_two_groups():
    """ZeRO's saved optimizer state is laid out per group: weight decay 0 still builds two to resume it."""
    from training.engine import build_optimizer

    opt = build_optimizer(_small_model(), TrainConfig(weight_decay=0.0), {}, resume_splits_decay=True)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    assert len(opt.param_groups[0]["params"]) == 1 and len(opt.param_groups[1]["params"]) == 3


def test_settings_changed_since_the_checkpoint_apply_after_loading_it():
    """load_state_dict brings back the saved groups' hyperparameters and the scheduler's base LR; the run
    config's must win, as the resume's "continuing with the new one" says."""
    from training.engine import build_optimizer, lr_multiplier, reapply_optimizer_settings, scheduler_factory

    old = TrainConfig(weight_decay=0.1, lr=3e-3, adam_beta2=0.95, adam_eps=1e-8, warmup_steps=2)
    model = _small_model()
    opt = build_optimizer(model, old, {})
    sched = scheduler_factory(old, 10)(opt)
    for _ in range(3):
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    new = TrainConfig(weight_decay=0.0, lr=1e-3, adam_beta2=0.99, adam_eps=1e-6, warmup_steps=2)
    opt = build_optimizer(model, new, {}, resume_splits_decay=True)
    sched = scheduler_factory(new, 10)(opt)
    opt.load_state_dict(saved_opt)
    sched.load_state_dict(saved_sched)
    assert opt.param_groups[0]["weight_decay"] == 0.1  # what loading alone leaves
    reapply_optimizer_settings(opt, sched, new)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    assert all(g["betas"] == (0.9, 0.99) and g["eps"] == 1e-6 for g in opt.param_groups)
    expected_lr = 1e-3 * lr_multiplier(3, 10, 2, "cosine", new.min_lr_ratio)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([expected_lr] * 2)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_multiplier(4, 10, 2, "cosine", new.min_lr_ratio))


@pytest.mark.parametrize("precision, stage, want", [("bf16", 1, "fp32"), ("bf16", 2, "fp32"), ("fp16", 3, "fp32"),
                                                    ("fp32", 2, "fp32"), ("bf16", 0, "bf16")])
def test_gradients_accumulate_in_fp32_wherever_zero_runs(precision, stage, want):
    path = DS_CONFIG_DIR / "zero2.json"
    cfg = resolve_ds_config(_train(precision=precision), DeepSpeedSection(zero_stage=stage), path, world_size=2)
    assert cfg["data_types"]["grad_accum_dtype"] == want


def test_hand_set_grad_accum_dtype_that_contradicts_is_refused(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "data_types": {"grad_accum_dtype": "bf16"}}))
    with pytest.raises(ConfigError, match=r"data_types\.grad_accum_dtype = 'bf16' contradicts train\.precision"):
        resolve_ds_config(_train(precision="bf16"), DeepSpeedSection(), path, world_size=2)
