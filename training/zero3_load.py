"""Load a safetensors checkpoint into a ZeRO-3 model, each rank reading only its own partition's slices.

Why not transformers' loader: ``from_pretrained`` under a live ``HfDeepSpeedConfig`` (transformers 5.x,
``_load_pretrained_model`` and ``integrations/deepspeed.py``) builds the model partitioned inside
``zero.Init``, but then global rank 0 opens every checkpoint file as one merged state dict and copies
each module's tensors in through ``GatheredParameters(modifier_rank=0)``. The memory map stays open
until the end, so every page of the checkpoint rank 0 touched stays resident: rank 0 peaks at its
partition plus the whole checkpoint (measured: +2.11 GB for a 358M model in bf16 stored in fp32, against
a 0.36 GB partition; benchmarks/RESULTS.md). At 70B that is 140-280 GB on one process.

Here the model is built from its config inside ``zero.Init`` (partitioned, nothing read), and every rank
then copies, tensor by tensor, only the rows of each checkpoint tensor that overlap its own flat
partition (DeepSpeed's layout: rank r of the parameter's group holds flat elements
``[r * n, (r + 1) * n)`` of the padded parameter, ``n = ds_tensor.ds_numel``). The files are reopened
after every ``READ_WINDOW_BYTES`` read so the mapped pages are let go. No collective runs while reading
and no rank holds more of a tensor than its slice plus one row. Host RAM per rank: its partition, one
module built whole by ``zero.Init`` before it partitions it (the largest is the embedding: 2 GB in bf16
at 70B), the read window and allocator slack (launcher/plan.py ``loading_bytes_per_rank``; measured in
benchmarks/RESULTS.md). Buffers are small and read whole on every rank.

Anything this loader does not handle exactly as transformers would (a folder that is not a local
safetensors checkpoint, a quantized one, names or shapes that do not match the model one to one,
NVMe-offloaded parameters) falls back to ``from_pretrained`` with one log line saying why.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from training.shard_writer import INDEX_FILE, SINGLE_FILE, ShardReader

log = logging.getLogger(__name__)
# Bytes a rank reads from one file before reopening it, which lets the pages mapped so far go (the plan's
# loading term counts it once per rank).
READ_WINDOW_BYTES = 16 * 2**20


@dataclass
class LoadPlan:
    """Which checkpoint tensor fills each parameter and buffer (one entry per distinct tensor)."""

    params: list[tuple[str, nn.Parameter]]
    buffers: list[tuple[str, torch.Tensor]]


def checkpoint_folder(name_or_path: str) -> Path | None:
    """The local folder of safetensors weights ``name_or_path`` names, or None (hub id, .bin weights)."""
    folder = Path(name_or_path)
    if (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file():
        return folder
    return None


def fallback_reason(name_or_path: str, ds_config: dict) -> str | None:
    """Why this checkpoint must go through ``from_pretrained`` instead, or None if it can stream."""
    if checkpoint_folder(name_or_path) is None:
        return f"{name_or_path} is not a local folder with {SINGLE_FILE} or {INDEX_FILE}"
    config = json.loads((checkpoint_folder(name_or_path) / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        return "the checkpoint is quantized"
    offload = (ds_config.get("zero_optimization", {}).get("offload_param") or {}).get("device")
    if offload == "nvme":
        return "parameters are offloaded to NVMe"
    return None


def build_partitioned(model_cfg, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The model from its config, built partitioned by ``zero.Init`` (needs a live ZeRO-3
    ``HfDeepSpeedConfig``), its parameters left uninitialised for :func:`load_weights` to fill.
    ``attn_implementation`` is transformers' name of the kernel (training.attention resolves ``auto``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision,
                                        trust_remote_code=model_cfg.trust_remote_code)
    with _no_zero3_random_init():
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                trust_remote_code=model_cfg.trust_remote_code)


@contextmanager
def _no_zero3_random_init():
    """``from_config`` under ZeRO-3 random-initialises the built model module by module, gathering each
    module's whole parameters on every rank (transformers' ``initialize_weights_zero3``). The checkpoint
    overwrites every parameter next, so that is only time and transient host RAM: skip it."""
    import transformers.integrations.deepspeed as hf_deepspeed

    original = hf_deepspeed.initialize_weights_zero3
    hf_deepspeed.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        hf_deepspeed.initialize_weights_zero3 = original


def plan_load(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> LoadPlan | str:
    """Pair every parameter and persistent buffer with its checkpoint tensor, or say why they do not pair
    one to one (a missing or unexpected name, a shape that differs, a tied weight stored twice)."""
    aliases: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
        tensors[id(param)] = param
    persistent = set(model.state_dict().keys())
    for name, buf in model.named_buffers(remove_duplicate=False):
        if name in persistent:
            aliases.setdefault(id(buf), []).append(name)
            tensors[id(buf)] = buf
    plan = LoadPlan(params=[], buffers=[])
    for key, names in aliases.items():
        stored = [n for n in names if n in shapes]
        if len(stored) != 1:
            what = "no checkpoint tensor" if not stored else f"{len(stored)} checkpoint tensors ({', '.join(stored)})"
            return f"{what} for {names[0]}"
        tensor, name = tensors[key], stored[0]
        shape = tuple(tensor.ds_shape) if hasattr(tensor, "ds_shape") else tuple(tensor.shape)
        if tuple(shapes[name]) != shape:
            return f"{name} is {tuple(shapes[name])} in the checkpoint but {shape} in the model"
        (plan.params if isinstance(tensor, nn.Parameter) else plan.buffers).append((name, tensor))
    known = {n for names in aliases.values() for n in names}
    unexpected = sorted(set(shapes) - known)
    if unexpected:
        return f"the checkpoint holds {len(unexpected)} tensor(s) the model does not, such as {unexpected[0]}"
    return plan


def partition_range(param: nn.Parameter) -> tuple[int, int]:
    """[start, stop) of the flat elements of ``param`` this rank's ZeRO-3 partition holds (stop > numel
    is clipped: the last partition is padded)."""
    size = param.ds_tensor.ds_numel
    start = size * torch.distributed.get_rank(group=param.ds_process_group)
    return min(start, param.ds_numel), min(start + size, param.ds_numel)


def fill_partition(param: nn.Parameter, reader: ShardReader, name: str) -> None:
    """Copy this rank's slice of checkpoint tensor ``name`` into ``param.ds_tensor``, reading only the rows
    that overlap it; ``copy_`` converts the dtype as transformers' loading does."""
    start, stop = partition_range(param)
    if start == stop:
        return
    shape = tuple(param.ds_shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    first, last = start // row, -(-stop // row)
    rows = reader.get_rows(name, first, last) if shape else reader.get(name)
    flat = rows.reshape(-1)[start - first * row: stop - first * row]
    with torch.no_grad():
        param.ds_tensor.narrow(0, 0, stop - start).copy_(flat)


def load_weights(model: nn.Module, folder: Path, window_bytes: int = READ_WINDOW_BYTES) -> str | None:
    """Fill ``model`` (built by :func:`build_partitioned`) from ``folder``; returns why it could not
    (nothing was changed then), or None when every parameter and persistent buffer is loaded."""
    reader = ShardReader(folder, window_bytes=window_bytes)
    plan = plan_load(model, reader.shapes())
    if isinstance(plan, str):
        return plan
    order = {name: i for i, name in enumerate(sorted(reader.files, key=lambda n: (str(reader.files[n]), n)))}
    for name, param in sorted(plan.params, key=lambda item: order[item[0]]):
        fill_partition(param, reader, name)
    with torch.no_grad():
        for name, buf in plan.buffers:
            buf.copy_(reader.get(name))
    return None


def finish_like_from_pretrained(model: nn.Module, folder: Path) -> None:
    """What ``from_pretrained`` does after loading that building from a config does not: eval mode and the
    folder's generation config."""
    from transformers import GenerationConfig

    model.eval()
    if model.can_generate() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)


def load_streaming(model_cfg, dtype: torch.dtype, ds_config: dict, attn_implementation: str) -> nn.Module | None:
    """The ZeRO-3 model loaded from a local safetensors checkpoint one partition slice at a time, or None
    (with one log line saying why) when the checkpoint needs ``from_pretrained``."""
    reason = fallback_reason(model_cfg.name_or_path, ds_config)
    if reason is None:
        model = build_partitioned(model_cfg, dtype, attn_implementation)
        folder = checkpoint_folder(model_cfg.name_or_path)
        reason = load_weights(model, folder)
        if reason is None:
            finish_like_from_pretrained(model, folder)
            return model
        del model
    log.warning("ZeRO-3 loading through transformers' from_pretrained (global rank 0 maps the whole "
                "checkpoint): %s", reason)
    return None

