"""The DeepSpeed side of training: resolve the ds_config against the YAML, build optimizer, schedule, engine.

The YAML owns every number that must agree with DeepSpeed. The JSON may leave them ``"auto"``; a value
set by hand that contradicts the YAML is an error naming both. The optimizer (torch AdamW) and the LR
schedule (a pure function of the optimizer step, so resuming is exact) are built here, not by DeepSpeed:
DeepSpeed's own CPU Adam needs a compiled extension, and torch's AdamW works under every ZeRO stage.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from training.config import ConfigError, DeepSpeedSection, TrainConfig


def resolve_ds_config(train: TrainConfig, ds_section: DeepSpeedSection, json_path: Path,
                      world_size: int) -> dict:
    """Load the DeepSpeed JSON, fill every ``"auto"`` from ``train``, and refuse contradictions.

    ``ds_section.zero_stage`` (an int) overrides the JSON's stage. The optimizer and scheduler sections,
    if present, are checked against ``train`` and then removed: we build both ourselves.
    """
    try:
        raw = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError([f"deepspeed.config: {json_path} is not valid JSON ({exc})"]) from None
    cfg, problems = copy.deepcopy(raw), []
    wanted = _yaml_values(train, world_size)
    for key, value in wanted.items():
        _agree(cfg, key, value, json_path, problems)
    _check_optimizer_sections(cfg, train, json_path, problems)
    _resolve_stage(cfg, ds_section, problems)
    if not problems:
        _agree(cfg, "data_types.grad_accum_dtype", grad_accum_dtype(train.precision, zero_stage(cfg)), json_path,
               problems)
    if problems:
        raise ConfigError(problems)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    # torch's AdamW is not on DeepSpeed's list of ZeRO-tested optimizers, but it is correct under ZeRO.
    cfg["zero_allow_untested_optimizer"] = True
    if offloads_optimizer(cfg) and not torch.cuda.is_available():
        # No GPU: torch's AdamW already steps on the CPU, so DeepSpeed's "use CPU Adam" guard is moot.
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def _yaml_values(train: TrainConfig, world_size: int) -> dict[str, Any]:
    from training.steps import data_parallel_size

    micro, accum = train.micro_batch_size, train.gradient_accumulation_steps
    data_parallel = data_parallel_size(world_size, train.sequence_parallel_size)
    values = {
        "train_micro_batch_size_per_gpu": (micro, "train.micro_batch_size"),
        "gradient_accumulation_steps": (accum, "train.gradient_accumulation_steps"),
        "train_batch_size": (micro * accum * data_parallel,
                             f"train.micro_batch_size x train.gradient_accumulation_steps x data-parallel "
                             f"{data_parallel}"),
        "gradient_clipping": (float(train.grad_clip), "train.grad_clip"),
        "bf16.enabled": (train.precision == "bf16", "train.precision"),
        "fp16.enabled": (train.precision == "fp16", "train.precision"),
    }
    if train.sequence_parallel_size > 1:
        # DeepSpeed divides its world by this key in its batch arithmetic only; no mpu is passed, so ZeRO
        # still partitions and reduces over every rank (training/sequence_parallel.py says why).
        values["sequence_parallel_size"] = (train.sequence_parallel_size, "train.sequence_parallel_size")
    return values


def grad_accum_dtype(precision: str, stage: int) -> tuple[str, str]:
    """DeepSpeed's ``data_types.grad_accum_dtype`` for the YAML's precision and stage, with the key that owns it.

    fp32 wherever ZeRO runs (stages 1-3 keep fp32 gradient partitions, whatever the training precision):
    summing 8-16 micro-batches of bf16 gradients on many ranks loses precision (DeepSpeed's default is the
    model dtype). Without ZeRO, DeepSpeed supports only the model dtype (it raises "unsupported mix").
    """
    if precision == "fp32" or stage >= 1:
        return "fp32", f"train.precision {precision} with ZeRO stage {stage} (fp32 accumulation)"
    return precision, f"train.precision {precision} with ZeRO stage 0 (DeepSpeed accumulates in the model dtype)"


def _agree(cfg: dict, dotted: str, wanted: tuple[Any, str], json_path: Path, problems: list[str]) -> None:
    """Set ``cfg[dotted]`` to the YAML value, unless the JSON holds a different hand-set value."""
    value, yaml_key = wanted
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    current = node.get(leaf, "auto")
    if current != "auto" and current != value and not _numbers_equal(current, value):
        problems.append(f"{json_path.name}: {dotted} = {current!r} contradicts {yaml_key} = {value!r}; "
                        f"set it to \"auto\" in the JSON (the YAML owns it) or change the YAML")
    node[leaf] = value


def _numbers_equal(a, b) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
        and not isinstance(b, bool) and math.isclose(a, b, rel_tol=1e-9)


def _check_optimizer_sections(cfg: dict, train: TrainConfig, json_path: Path, problems: list[str]) -> None:
    opt_type = cfg.get("optimizer", {}).get("type", "auto")
    if str(opt_type).lower() not in ("auto", "adam", "adamw"):
        problems.append(f"{json_path.name}: optimizer.type = {opt_type!r}, but training uses AdamW configured by "
                        f"train.lr, train.adam_beta1/2, train.adam_eps, train.weight_decay; remove the optimizer "
                        f"section")
    opt = cfg.get("optimizer", {}).get("params", {})
    pairs = {"lr": (train.lr, "train.lr"), "weight_decay": (train.weight_decay, "train.weight_decay"),
             "eps": (train.adam_eps, "train.adam_eps")}
    for key, (value, yaml_key) in pairs.items():
        if key in opt and opt[key] != "auto" and not _numbers_equal(opt[key], value):
            problems.append(f"{json_path.name}: optimizer.params.{key} = {opt[key]!r} contradicts {yaml_key} = "
                            f"{value!r}; remove the optimizer section (the YAML owns the optimizer)")
    betas = opt.get("betas", "auto")
    if betas != "auto" and list(betas) != [train.adam_beta1, train.adam_beta2]:
        problems.append(f"{json_path.name}: optimizer.params.betas = {betas!r} contradicts train.adam_beta1, "
                        f"train.adam_beta2 = [{train.adam_beta1}, {train.adam_beta2}]")
    sched = cfg.get("scheduler", {}).get("params", {})
    warmup = sched.get("warmup_num_steps", "auto")
    if warmup != "auto" and warmup != train.warmup_steps:
        problems.append(f"{json_path.name}: scheduler.params.warmup_num_steps = {warmup!r} contradicts "
                        f"train.warmup_steps = {train.warmup_steps}")


def _resolve_stage(cfg: dict, ds_section: DeepSpeedSection, problems: list[str]) -> None:
    stage = ds_section.zero_stage
    if stage == "auto":
        problems.append("deepspeed.zero_stage: 'auto' is resolved by the launcher; start the run with "
                        "`zerotune launch CONFIG`, or set an int 0-3 (or null to keep the JSON's stage)")
        return
    zero = cfg.setdefault("zero_optimization", {})
    if stage is not None:
        zero["stage"] = int(stage)
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage: must be 0-3, got {zero.get('stage')!r}")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


# --------------------------------------------------------------------------- optimizer and schedule


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """LR factor for the optimizer step ``step`` (0-based): linear warmup, then cosine/linear decay or flat.

    Warmup reaches the peak at step ``warmup_steps - 1``; decay ends at ``min_lr_ratio`` on the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def build_optimizer(model: torch.nn.Module, train: TrainConfig, ds_config: dict,
                    resume_splits_decay: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors), so one
    parameter group when ``train.weight_decay`` is 0 and two otherwise, or two when resuming a checkpoint
    saved with two (ZeRO's optimizer state is laid out per group).

    torch's AdamW, except with ZeRO-Offload on a GPU machine: there the optimizer steps on the CPU and
    DeepSpeed's vectorised CPU Adam (in AdamW mode; JIT-built on first use) is many times faster.
    """
    groups = _param_groups(model, train.weight_decay, split=train.weight_decay != 0 or bool(resume_splits_decay))
    kwargs = dict(lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps)
    if offloads_optimizer(ds_config) and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _param_groups(model: torch.nn.Module, weight_decay: float, split: bool) -> list[dict]:
    if not split:
        # Two groups with equal settings would only cost time: ZeRO keeps a flat buffer per group and
        # gathers, norms and steps each one separately (about 0.6% of a small model's step on CPU).
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # ZeRO-3 partitions parameters to empty tensors: ds_shape is the real shape.
            shape = getattr(param, "ds_shape", param.shape)
            (decay if len(shape) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def reapply_optimizer_settings(optimizer, lr_scheduler, train: TrainConfig) -> None:
    """After a checkpoint load: the run config's AdamW settings and peak LR, not the saved ones.

    Loading an optimizer state (torch's ``load_state_dict``, which DeepSpeed uses) brings back each group's
    saved hyperparameters, and the scheduler's saved base LR; a changed ``train.weight_decay``,
    ``adam_beta1/2``, ``adam_eps`` or ``lr`` would otherwise be ignored without a word. Group 0 is the
    decay group (see _param_groups); a second group holds biases and norms, never decayed.
    """
    groups = optimizer.param_groups
    for k, group in enumerate(groups):
        group["weight_decay"] = train.weight_decay if k == 0 else 0.0
        group["betas"] = (train.adam_beta1, train.adam_beta2)
        group["eps"] = train.adam_eps
        group["initial_lr"] = train.lr
    if lr_scheduler is not None:
        lr_scheduler.base_lrs = [train.lr] * len(groups)
        for group, factor in zip(groups, lr_scheduler.lr_lambdas):
            group["lr"] = train.lr * factor(lr_scheduler.last_epoch)


def scheduler_factory(train: TrainConfig, total_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    """A callable DeepSpeed uses to build the LambdaLR on its (possibly ZeRO-wrapped) optimizer."""
    def factory(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(
            step, total_steps, train.warmup_steps, train.lr_schedule, train.min_lr_ratio))
    return factory


def build_engine(model: torch.nn.Module, train: TrainConfig, ds_config: dict, total_steps: int,
                 resume_splits_decay: bool | None = None):
    """``deepspeed.initialize`` with our optimizer and schedule; returns the engine."""
    import deepspeed

    optimizer = build_optimizer(model, train, ds_config, resume_splits_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           lr_scheduler=scheduler_factory(train, total_steps))
    return engine
