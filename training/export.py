"""Consolidate a DeepSpeed checkpoint of any ZeRO stage into a verified Hugging Face model folder.

The weights come from DeepSpeed's own consolidation (``zero_to_fp32`` for stages 1-3, the module
states for stage 0); the architecture, tokenizer and generation config come from the run's
``model.name_or_path``. The folder is written beside its destination under a temporary name and renamed
into place only after it loads back, has every parameter, and reproduces the logits the trained model gave
on the probe batch saved with the checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training import checkpoint as ckpt
from training.model import PRECISION_DTYPES

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
    zero_stage: int
    dtype: str
    num_params: int
    probe_relative_error: float
    notes: list[str] = field(default_factory=list)


def export_checkpoint(run_dir: str | os.PathLike, out_dir: str | os.PathLike, tag: str | None = None,
                      dtype: str | None = None) -> ExportResult:
    """Export checkpoint ``tag`` of ``run_dir`` (default: the latest complete one) to ``out_dir``.

    ``dtype`` (fp32/bf16/fp16) overrides the saved precision, which is the training precision otherwise.
    Raises :class:`ExportError` for an incomplete checkpoint or a failed verification.
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
    stage = zero_stage(tag_dir)
    state = consolidated_state_dict(tag_dir, stage)
    model = _model_with_weights(cfg.model, state, PRECISION_DTYPES[save_precision])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_folder(model, cfg.model, tmp)
        del model
        probe_path = tag_dir / "probe.safetensors"
        tolerance = probe_tolerance(probe_path, cfg.train.precision, save_precision)
        num_params, error = verify_export(tmp, state, probe_path, PRECISION_DTYPES[save_precision], tolerance)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
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
    """Full, unpartitioned weights of the checkpoint in ``tag_dir`` (fp32 masters for stages 1-3)."""
    if stage == 0:
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return dict(states["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias name: canonical name} for parameters shared under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _model_with_weights(model_cfg, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """The run's base model with the consolidated weights loaded, every parameter accounted for."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision, dtype=dtype,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    aliases = _tied_aliases(model)
    state = dict(state)
    for alias, canonical in aliases.items():
        if alias in state and canonical in state and not torch.equal(state[alias], state[canonical]):
            raise ExportError(f"tied weights {alias} and {canonical} differ in the checkpoint; the tie was "
                              f"broken during training, so one folder cannot hold both")
        state.pop(alias, None)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in aliases]
    if missing or result.unexpected_keys:
        raise ExportError(f"checkpoint does not match {model_cfg.name_or_path}: missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]} (was it trained from another model?)")
    return model


def _write_folder(model, model_cfg, folder: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    model.config.use_cache = True  # training turned the cache off; generation wants it
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision)
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision,
                                              trust_remote_code=model_cfg.trust_remote_code)
    tokenizer.save_pretrained(folder)


# --------------------------------------------------------------------------- verification


def _saved_tensors(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                shapes[key] = tuple(fh.get_slice(key).get_shape())
    return shapes


def _expected_num_params(folder: Path) -> int:
    """Parameters of a fresh model built from the exported config (on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in fresh.parameters())


def verify_export(folder: Path, state: dict[str, torch.Tensor], probe_path: Path, dtype: torch.dtype,
                  tolerance: float) -> tuple[int, float]:
    """Check the written folder; returns (parameter count, probe relative error) or raises ExportError."""
    from transformers import AutoModelForCausalLM

    from training.probe import load_probe

    empty = [k for k, shape in _saved_tensors(folder).items() if 0 in shape]
    if empty:
        raise ExportError(f"export verification failed: zero-sized tensors {empty[:5]} "
                          f"(a partitioned ZeRO-3 parameter was saved without gathering)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    num_params = sum(p.numel() for p in model.parameters())
    expected = _expected_num_params(folder)
    if num_params != expected:
        raise ExportError(f"export verification failed: {num_params} parameters, the model has {expected}")
    reloaded = model.state_dict()
    for name, tensor in state.items():
        if name in reloaded and not torch.equal(reloaded[name], tensor.to(reloaded[name].dtype)):
            raise ExportError(f"export verification failed: {name} reloads different from the checkpoint")
    error = _probe_error(model, probe_path)
    if error > tolerance:
        raise ExportError(f"export verification failed: logits on the checkpoint's probe batch differ by "
                          f"{error:.3g} (relative to the largest logit; tolerance {tolerance:g}), so these "
                          f"weights are not the trained model's; the checkpoint files may be corrupt")
    model.generate(load_probe(probe_path)["input_ids"][:1, :4], max_new_tokens=2, do_sample=False)
    return num_params, error


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


def _probe_error(model, probe_path: Path) -> float:
    from training.probe import load_probe

    probe = load_probe(probe_path)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.float()
    expected = probe["logits"]
    if logits.shape != expected.shape:
        raise ExportError(f"export verification failed: probe logits have shape {tuple(expected.shape)}, "
                          f"the exported model gives {tuple(logits.shape)}")
    scale = expected.abs().max().clamp_min(1e-6)
    return float((logits - expected).abs().max() / scale)
