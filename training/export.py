"""Stream a DeepSpeed checkpoint of any ZeRO stage into a verified Hugging Face model folder.

Nothing holds the whole model: the architecture is built on the meta device from the run's
``model.name_or_path`` config, the weights are read from the ZeRO partitions one tensor at a time
(:mod:`training.zero_reader`), converted to the output dtype and appended to safetensors shards of bounded
size (:mod:`training.shard_writer`). Verification streams too: every written tensor is read back and
compared with its source, the names, shapes and parameter count are checked against a meta-device model
built from the written config, and the probe batch's logits are recomputed with one module's weights in
memory at a time (:mod:`training.streamed_model`). The folder is written beside its destination under a
temporary name, flushed to disk, and renamed into place only after all of that passes.

Host RAM at 70B: the largest tensor in fp32 (an embedding, a few GB) plus a 64 MiB read window, instead
of ~1 TB for the consolidated fp32 state dict plus the loaded model.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training import checkpoint as ckpt
from training.model import PRECISION_DTYPES
from training.best_weights import INFO_FILE as BEST_INFO_FILE
from training.best_weights import complete_best
from training.shard_writer import (DEFAULT_MAX_SHARD_SIZE, FolderWeights, ShardReader, ShardWriter, TensorSpec,
                                   parse_size, plan_shards, write_index)
from training.streamed_model import skeleton, streamed_model, tied_aliases
from training.zero_reader import PartitionError, ZeroWeights

# Largest tolerated max |logit difference| / max |logit| on the probe, by the coarser precision involved:
# the probe was computed on the training device, the check runs on CPU, so kernels round differently
# (bf16 keeps 8 bits of mantissa: ~0.4% per operation). A wrong or shuffled weight moves logits by far more.
PROBE_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}
# When the probe was computed on CPU in the precision the check uses, only summation order can differ.
SAME_DEVICE_TOLERANCE = 1e-3
PRECISION_ORDER = ("fp32", "fp16", "bf16")


class ExportError(RuntimeError):
    """An export that cannot proceed or whose result failed verification (nothing is left at --out)."""

    user_error = True


@dataclass
class ExportResult:
    """What was exported and how it verified."""

    out_dir: Path
    tag: str
    zero_stage: int | None  # None: the best weights (saved weights only), not a ZeRO checkpoint
    dtype: str
    num_params: int
    probe_relative_error: float
    notes: list[str] = field(default_factory=list)


def export_checkpoint(run_dir: str | os.PathLike, out_dir: str | os.PathLike, tag: str | None = None,
                      dtype: str | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> ExportResult:
    """Export checkpoint ``tag`` of ``run_dir`` (default: the latest complete one) to ``out_dir``.

    ``dtype`` (fp32/bf16/fp16) overrides the saved precision, which is the training precision otherwise;
    weights go to safetensors files of at most ``max_shard_size`` (with an index when there are several).
    Raises :class:`ExportError` for an incomplete or damaged checkpoint or a failed verification.
    """
    from training.config import load_config

    run, out = Path(run_dir), Path(out_dir)
    if not (run / "config.yaml").is_file():
        raise ExportError(f"{run}: not a run directory (no config.yaml); pass the run's output_dir")
    cfg = load_config(run / "config.yaml", validate=False)
    tag_dir, notes = resolve_checkpoint(run / "checkpoints", tag)
    save_precision = dtype or cfg.train.precision
    if save_precision not in PRECISION_DTYPES:
        raise ExportError(f"--dtype: {save_precision!r} is not one of {', '.join(PRECISION_DTYPES)}")
    try:
        max_shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    stage = None if (tag_dir / BEST_INFO_FILE).is_file() else zero_stage(tag_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weights = _open_weights(tag_dir, stage)
        config = _export_config(cfg.model, PRECISION_DTYPES[save_precision])
        model = skeleton(config, PRECISION_DTYPES[save_precision])
        config.architectures = [type(model).__name__]
        plan = _write_weights(weights, model, cfg.model, max_shard_bytes, tmp)
        notes += _write_extras(config, cfg, tmp)
        probe_path = tag_dir / "probe.safetensors"
        tolerance = probe_tolerance(probe_path, cfg.train.precision, save_precision)
        num_params, error = verify_export(tmp, weights, plan, probe_path, PRECISION_DTYPES[save_precision],
                                          tolerance)
        _fsync_folder(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        ckpt.fsync_path(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, tag_dir.name, stage, save_precision, num_params, error, notes)


# --------------------------------------------------------------------------- finding the checkpoint


def _read_pointer(ckpt_root: Path, name: str) -> str | None:
    pointer = ckpt_root / name
    return pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None


def resolve_checkpoint(ckpt_root: Path, tag: str | None) -> tuple[Path, list[str]]:
    """The checkpoint folder for ``tag`` (a tag name, ``latest``, ``best``, or None for the latest complete
    one, as resuming picks it) and notes on what was skipped to find it."""
    if not ckpt_root.is_dir():
        raise ExportError(f"{ckpt_root}: no checkpoints folder; has the run saved a checkpoint yet?")
    complete = ", ".join(ckpt.complete_tags(ckpt_root)) or "none"
    if tag is None:
        chosen, notes = ckpt.find_resume_tag(ckpt_root)
        if chosen is None:
            raise ExportError(f"{ckpt_root}: no complete checkpoint (none has both {ckpt.COMPLETE_MARKER} and "
                              f"{ckpt.STATE_FILE}); a save was interrupted or none has run yet")
        return ckpt_root / chosen, notes
    if tag == "best" and (best := complete_best(ckpt_root)) is not None:
        return best, []
    name = _read_pointer(ckpt_root, tag) if tag in ("latest", "best") else tag
    if not name:
        raise ExportError(f"--tag {tag}: {ckpt_root / tag} does not exist (no {tag} checkpoint recorded); "
                          f"complete checkpoints: {complete}")
    tag_dir = ckpt_root / name
    if not tag_dir.is_dir():
        raise ExportError(f"--tag {tag}: checkpoint {tag_dir} does not exist; complete checkpoints: {complete}")
    if not ckpt.is_complete(tag_dir):
        raise ExportError(f"checkpoint {tag_dir} is incomplete (no {ckpt.COMPLETE_MARKER} marker or "
                          f"{ckpt.STATE_FILE}: the save was interrupted); export another with --tag, "
                          f"complete ones: {complete}")
    return tag_dir, []


def zero_stage(tag_dir: Path) -> int:
    """The ZeRO stage the checkpoint was saved with, read from the DeepSpeed config stored inside it."""
    files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")) or \
        [tag_dir / "mp_rank_00_model_states.pt"]
    if not files[0].is_file():
        raise ExportError(f"{tag_dir}: no DeepSpeed model states found (expected mp_rank_00_model_states.pt "
                          f"or zero_pp_rank_*_model_states.pt)")
    # mmap: only the small config is read, not the weights stored beside it.
    states = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    return int((states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))


# --------------------------------------------------------------------------- weights


def consolidated_state_dict(tag_dir: Path, stage: int) -> dict[str, torch.Tensor]:
    """Full, unpartitioned weights of the checkpoint in ``tag_dir`` by DeepSpeed's own consolidation
    (fp32 masters for stages 1-3), all in memory at once: the slow, obviously-correct reference that
    :class:`training.zero_reader.ZeroWeights` is tested against. Export never calls it."""
    if stage == 0:
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return dict(states["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def _open_weights(tag_dir: Path, stage: int | None) -> ZeroWeights | FolderWeights:
    """The checkpoint's tensors: a ZeRO checkpoint's partitions, or a best-weights folder (stage None)."""
    if stage is None:
        return FolderWeights(tag_dir)
    try:
        return ZeroWeights(tag_dir, stage)
    except PartitionError as exc:
        raise ExportError(str(exc)) from None


def _export_config(model_cfg, dtype: torch.dtype):
    """The base model's config as the exported folder carries it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision,
                                        trust_remote_code=model_cfg.trust_remote_code)
    config.use_cache = True  # training turned the cache off; generation wants it
    config.dtype = dtype
    return config


def _planned_specs(weights: ZeroWeights | FolderWeights, model: torch.nn.Module, model_cfg) -> list[TensorSpec]:
    """One spec per tensor the folder will hold, in the model's order; the checkpoint must match it."""
    aliases = tied_aliases(model)
    dtype = next(model.parameters()).dtype
    expected = {name: t for name, t in model.state_dict().items() if name not in aliases}
    stored = set(weights.shapes)
    for alias, canonical in aliases.items():
        if alias in stored and canonical in stored and not torch.equal(weights.read(alias), weights.read(canonical)):
            raise ExportError(f"tied weights {alias} and {canonical} differ in the checkpoint; the tie was "
                              f"broken during training, so one folder cannot hold both")
    missing = sorted(set(expected) - stored)
    unexpected = sorted(stored - set(expected) - set(aliases))
    wrong = [n for n in expected if n in stored and tuple(weights.shapes[n]) != tuple(expected[n].shape)]
    if missing or unexpected or wrong:
        raise ExportError(f"checkpoint does not match {model_cfg.name_or_path}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, other shapes {wrong[:5]} (was it trained from another "
                          f"model?)")
    return [TensorSpec(name, tuple(t.shape), dtype if weights.source_dtype(name).is_floating_point
                       else weights.source_dtype(name)) for name, t in expected.items()]


def _write_weights(weights: ZeroWeights | FolderWeights, model: torch.nn.Module, model_cfg, max_shard_bytes: int,
                   folder: Path) -> dict[str, list[TensorSpec]]:
    """Stream the checkpoint's tensors, converted to the model's dtype, into shards; returns the plan."""
    shards = plan_shards(_planned_specs(weights, model, model_cfg), max_shard_bytes)
    for file, specs in shards.items():
        writer = ShardWriter(folder / file, specs)
        for spec in specs:
            writer.add(spec.name, weights.read(spec.name).to(spec.dtype))
        writer.close()
    write_index(folder, shards, sum(p.numel() for p in model.parameters()))
    return shards


def _write_extras(config, cfg, folder: Path) -> list[str]:
    """config.json, generation_config.json and the tokenizer, beside the weights; returns notes for the
    user. The tokenizer carries the chat template the training data was rendered with."""
    from transformers import AutoTokenizer, GenerationConfig

    model_cfg = cfg.model
    config.save_pretrained(folder)
    try:
        generation = GenerationConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision,
                                              trust_remote_code=model_cfg.trust_remote_code)
    notes = _carry_chat_template(tokenizer, cfg.data)
    tokenizer.save_pretrained(folder)
    return notes


def _carry_chat_template(tokenizer, data_cfg) -> list[str]:
    """Set the tokenizer's chat template to the one prep rendered the data with (data.chat_template), so
    that ``apply_chat_template`` on the exported model formats prompts as the model was trained."""
    from data_prep.errors import DataError
    from data_prep.template import resolve_chat_template

    notes = []
    if data_cfg.template == "chat" and data_cfg.chat_template:
        try:
            tokenizer.chat_template = resolve_chat_template(tokenizer, data_cfg.chat_template)[0]
        except DataError as exc:
            raise ExportError(f"{exc}; the run was trained on data rendered with it and the exported tokenizer "
                              f"must carry it: run export from the folder prep ran in, or make data.chat_template "
                              f"in the run's config.yaml an absolute path") from None
        notes.append(f"the tokenizer carries data.chat_template {data_cfg.chat_template} (the template the "
                     f"training data was rendered with)")
    if data_cfg.template == "chat" and data_cfg.system_prompt:
        notes.append("the training conversations without their own system message got data.system_prompt as "
                     "one; send the same system message at inference")
    return notes


def _fsync_folder(folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            ckpt.fsync_path(path)
    ckpt.fsync_path(folder)


# --------------------------------------------------------------------------- verification


def verify_export(folder: Path, weights: ZeroWeights | FolderWeights, plan: dict[str, list[TensorSpec]],
                  probe_path: Path, dtype: torch.dtype, tolerance: float) -> tuple[int, float]:
    """Check the written folder tensor by tensor; returns (parameter count, probe relative error) or
    raises ExportError. Host RAM: two tensors at a time, then one module's weights for the probe."""
    reader = ShardReader(folder)
    shapes = reader.shapes()
    empty = [k for k, shape in shapes.items() if 0 in shape]
    if empty:
        raise ExportError(f"export verification failed: zero-sized tensors {empty[:5]} "
                          f"(a partitioned ZeRO-3 parameter was saved without gathering)")
    num_params = _check_against_config(folder, shapes, dtype)
    for specs in plan.values():
        for spec in specs:
            if not torch.equal(reader.get(spec.name), weights.read(spec.name).to(spec.dtype)):
                raise ExportError(f"export verification failed: {spec.name} reads back different from the "
                                  f"checkpoint")
    error = _probe_error(folder, dtype, probe_path)
    if error > tolerance:
        raise ExportError(f"export verification failed: logits on the checkpoint's probe batch differ by "
                          f"{error:.3g} (relative to the largest logit; tolerance {tolerance:g}), so these "
                          f"weights are not the trained model's; the checkpoint files may be corrupt")
    return num_params, error


def _check_against_config(folder: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """Names and shapes written == those of a model built from the written config (on the meta device);
    returns its parameter count."""
    from transformers import AutoConfig

    model = skeleton(AutoConfig.from_pretrained(folder), dtype)
    aliases = tied_aliases(model)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in aliases}
    if expected != shapes:
        differ = sorted(set(expected) ^ set(shapes)) or sorted(n for n in expected if expected[n] != shapes[n])
        raise ExportError(f"export verification failed: the written tensors do not match the model its config "
                          f"describes (first differences: {differ[:5]})")
    num_params = sum(p.numel() for p in model.parameters())
    written = sum(math.prod(shapes[n]) for n, _ in model.named_parameters())
    if written != num_params:
        raise ExportError(f"export verification failed: {written} parameters written, the model has {num_params}")
    return num_params


def probe_tolerance(probe_path: Path, train_precision: str, save_precision: str) -> float:
    """How far the recomputed probe logits may be from the saved ones (see PROBE_TOLERANCE)."""
    from training.probe import probe_metadata

    if not probe_path.is_file():
        raise ExportError(f"{probe_path}: missing; the checkpoint has no probe to verify the export against")
    coarser = max(train_precision, save_precision, key=PRECISION_ORDER.index)
    meta = probe_metadata(probe_path)
    if meta.get("device_type") == "cpu" and train_precision == save_precision:
        return min(SAME_DEVICE_TOLERANCE, PROBE_TOLERANCE[coarser])
    return PROBE_TOLERANCE[coarser]


def _probe_error(folder: Path, dtype: torch.dtype, probe_path: Path) -> float:
    """Max |logit difference| / max |logit| of the exported model on the checkpoint's probe batch."""
    from training.probe import load_probe

    probe = load_probe(probe_path)
    with streamed_model(folder, dtype) as model, torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.float()
    expected = probe["logits"]
    if logits.shape != expected.shape:
        raise ExportError(f"export verification failed: probe logits have shape {tuple(expected.shape)}, "
                          f"the exported model gives {tuple(logits.shape)}")
    scale = expected.abs().max().clamp_min(1e-6)
    return float((logits - expected).abs().max() / scale)
