"""The run config: one YAML file, one typed dataclass per section, loaded strictly.

Every problem found while loading (unknown key, wrong type, bad value, a cross-field
mismatch) is collected and raised together as one :class:`ConfigError`, each line
naming its dotted key. Components receive their own section, never the whole config.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from data_prep.config import DataConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"


class ConfigError(ValueError):
    """One or more problems in a run config, each naming its dotted key."""

    user_error = True

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        head = f"invalid config {source}" if source else "invalid config"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head} ({len(self.problems)} problem(s)):\n{lines}")


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to build it."""

    name_or_path: str = ""
    # A hub model's branch, tag or commit (pins the tokenizer and weights a run uses); null: the default branch.
    revision: Optional[str] = None
    # auto (a varlen kernel on CUDA, else flex_attention on CUDA, else sdpa), sdpa, eager, flex_attention,
    # varlen (torch's varlen_attn), flash_attention_2, flash_attention_3; see training/attention.py.
    attn_implementation: str = "auto"
    # "none", "full" (every layer) or "every_k" (every k-th layer, k = checkpoint_every_k_layers).
    gradient_checkpointing: Literal["none", "full", "every_k"] = "none"
    checkpoint_every_k_layers: int = 2
    trust_remote_code: bool = False


@dataclass
class TrainConfig:
    """The optimisation: loop, batch arithmetic, precision, optimizer and schedule."""

    loop: str = "sft"
    max_steps: Optional[int] = None
    epochs: int = 1
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # When set, it is fixed: on any world size that divides it, accumulation (then the micro-batch, never
    # above micro_batch_size) adapts so micro x accumulation x data-parallel equals it (training.steps).
    global_batch_size: Optional[int] = None
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    lr: float = 2e-5
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    # Pad each batch to its longest sequence ("batch") or always to data.seq_len ("seq_len",
    # fixed shapes for compiled kernels).
    pad_to: Literal["batch", "seq_len"] = "batch"
    # The loss runs the LM head and cross-entropy this many tokens at a time (training/loss.py), so the full
    # fp32 logits never exist; 0 is the plain loss over all logits at once.
    loss_chunk_tokens: int = 1024
    # Ranks per sequence-parallel group: each packed row is split along the sequence across this many
    # consecutive ranks (Ulysses all-to-all attention, training/sequence_parallel.py); 1 is off.
    sequence_parallel_size: int = 1


@dataclass
class EvalConfig:
    """Validation cadence, early stopping and the final test evaluation."""

    every_steps: Optional[int] = 100
    micro_batch_size: Optional[int] = None
    max_batches: Optional[int] = None
    early_stopping_patience: Optional[int] = None
    early_stopping_min_delta: float = 0.0
    test_with: Literal["best", "last"] = "best"
    sample_generations: int = 3
    max_new_tokens: int = 48


@dataclass
class DeepSpeedSection:
    """Which DeepSpeed JSON to start from; the YAML owns the numbers that must agree."""

    config: str = "zero2.json"
    # None keeps the stage written in the JSON; "auto" lets `zerotune plan` pick one.
    zero_stage: Optional[Union[int, str]] = None
    timeout_minutes: int = 30


@dataclass
class CheckpointConfig:
    """When to save, how many to keep, and whether to resume."""

    every_steps: Optional[int] = 500
    keep_last: int = 2
    keep_best: bool = True
    resume: Literal["auto", "never"] = "auto"


@dataclass
class LoggingConfig:
    """TensorBoard and console logging."""

    tensorboard_dir: Optional[str] = None
    log_every_steps: int = 1


@dataclass
class RunConfig:
    """A whole run: one section per component plus the run directory."""

    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """A stable hash of the resolved config (sorted JSON)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def tensorboard_dir(self) -> str:
        return self.logging.tensorboard_dir or str(Path(self.output_dir) / "tensorboard")

    def ds_config_path(self) -> Path:
        return resolve_ds_config_path(self.deepspeed.config)

    def validate(self, world_size: int | None = None) -> None:
        """Cross-field checks; raises one ConfigError listing every problem with its arithmetic."""
        problems = _cross_field_problems(self, world_size)
        if problems:
            raise ConfigError(problems)


REQUIRED_KEYS = ("model.name_or_path", "data.sources", "output_dir")


def _cross_field_problems(cfg: RunConfig, world_size: int | None) -> list[str]:
    p: list[str] = []
    t, d, e, c = cfg.train, cfg.data, cfg.eval, cfg.checkpoint
    for key in REQUIRED_KEYS:
        value = _get_dotted(cfg, key)
        if value in ("", None, []):
            p.append(f"{key}: required, but not set")
    positives = {
        "data.seq_len": d.seq_len, "data.num_shards": d.num_shards, "data.map_batch_size": d.map_batch_size,
        "train.micro_batch_size": t.micro_batch_size,
        "train.gradient_accumulation_steps": t.gradient_accumulation_steps, "train.epochs": t.epochs,
        "checkpoint.keep_last": c.keep_last, "model.checkpoint_every_k_layers": cfg.model.checkpoint_every_k_layers,
        "logging.log_every_steps": cfg.logging.log_every_steps,
        "train.sequence_parallel_size": t.sequence_parallel_size,
    }
    for key, value in positives.items():
        if value < 1:
            p.append(f"{key}: must be >= 1, got {value}")
    if d.num_proc != "auto" and d.num_proc < 1:
        p.append(f"data.num_proc: must be >= 1 or auto (the usable CPUs), got {d.num_proc}")
    for key, value in {"train.max_steps": t.max_steps, "eval.every_steps": e.every_steps,
                       "checkpoint.every_steps": c.every_steps, "eval.micro_batch_size": e.micro_batch_size,
                       "eval.max_batches": e.max_batches, "eval.early_stopping_patience": e.early_stopping_patience}.items():
        if value is not None and value < 1:
            p.append(f"{key}: must be >= 1 or null, got {value}")
    frac = d.validation_fraction + d.test_fraction
    if d.validation_fraction < 0 or d.test_fraction < 0 or frac >= 1:
        p.append(f"data.validation_fraction + data.test_fraction = {d.validation_fraction} + "
                 f"{d.test_fraction} = {frac:g}: each must be >= 0 and the sum < 1")
    if d.template == "format":
        fs = d.format_string or ""
        if "{prompt}" not in fs or "{response}" not in fs:
            p.append("data.format_string: with data.template: format it must contain {prompt} and {response}")
    if t.lr <= 0:
        p.append(f"train.lr: must be > 0, got {t.lr}")
    if not 0 <= t.min_lr_ratio <= 1:
        p.append(f"train.min_lr_ratio: must be within [0, 1], got {t.min_lr_ratio}")
    if t.max_steps is not None and t.warmup_steps > t.max_steps:
        p.append(f"train.warmup_steps {t.warmup_steps} > train.max_steps {t.max_steps}")
    if t.loss_chunk_tokens < 0:
        p.append(f"train.loss_chunk_tokens: must be >= 0 (0 is the plain loss), got {t.loss_chunk_tokens}")
    if t.grad_clip < 0:
        p.append(f"train.grad_clip: must be >= 0 (0 disables clipping), got {t.grad_clip}")
    stage = cfg.deepspeed.zero_stage
    if stage is not None and stage not in (0, 1, 2, 3, "auto"):
        p.append(f"deepspeed.zero_stage: must be 0, 1, 2, 3, auto or null, got {stage!r}")
    if not cfg.ds_config_path().is_file():
        p.append(f"deepspeed.config: {cfg.deepspeed.config!r} not found (looked at {cfg.ds_config_path()}); "
                 f"shipped: {', '.join(sorted(x.name for x in DS_CONFIG_DIR.glob('*.json')))}")
    if world_size is not None:
        p += _batch_problems(t, world_size)
    return p


def _batch_problems(t: TrainConfig, world_size: int) -> list[str]:
    """The sequence-parallel groups must tile the world, and the data-parallel ranks share the global batch."""
    from training.steps import BatchError, data_parallel_size, resolve_batch

    if t.sequence_parallel_size < 1:
        return []  # reported with the other positives
    try:
        data_parallel = data_parallel_size(world_size, t.sequence_parallel_size)
        if t.global_batch_size is not None:
            resolve_batch(t.micro_batch_size, t.gradient_accumulation_steps, t.global_batch_size, data_parallel)
    except BatchError as exc:
        return [str(exc)]
    return []


def resolve_ds_config_path(name: str) -> Path:
    """A path as given, or a bare name (``zero2`` / ``zero2.json``) from the shipped ``ds_configs/``."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = DS_CONFIG_DIR / (name if name.endswith(".json") else f"{name}.json")
    return candidate if candidate.is_file() else path


# --------------------------------------------------------------------------- strict loading


def load_config(path: str | Path, overrides: list[str] | None = None, validate: bool = True) -> RunConfig:
    """Load a YAML run config strictly, apply ``dotted.key=value`` overrides, and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"])
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictYamlLoader)  # noqa: S506 - safe subclass
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path} is not valid YAML: {exc}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}"])
    problems: list[str] = []
    for item in overrides or []:
        _apply_override(raw, item, problems)
    cfg = from_dict(RunConfig, raw, problems=problems)
    if problems:
        raise ConfigError(problems, source=str(path))
    if validate:
        try:
            cfg.validate()
        except ConfigError as exc:
            raise ConfigError(exc.problems, source=str(path)) from None
    return cfg


def config_from_dict(raw: dict, validate: bool = True) -> RunConfig:
    """Build a RunConfig from an already-parsed mapping (tests, the resolved copy in a run dir)."""
    problems: list[str] = []
    cfg = from_dict(RunConfig, raw, problems=problems)
    if problems:
        raise ConfigError(problems)
    if validate:
        cfg.validate()
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one section (line {key_node.start_mark.line + 1}); "
                                f"keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_YAML_NULLS = ("", "null", "Null", "NULL", "~")


def _apply_override(raw: dict, item: str, problems: list[str]) -> None:
    if "=" not in item:
        problems.append(f"--set {item!r}: expected dotted.key=value")
        return
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    if value is None and text.strip() not in _YAML_NULLS:
        value = text  # YAML reads "#..." as a comment, which would silently null the key
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            problems.append(f"--set {key}: {part} is not a section")
            return
        node = nxt
    node[parts[-1]] = value


def from_dict(cls, data: Any, prefix: str = "", problems: list[str] | None = None):
    """Build dataclass ``cls`` from ``data``, appending every problem (with dotted path) to ``problems``."""
    own = problems is None
    problems = [] if own else problems
    where = prefix or "(top level)"
    if data is None and prefix:
        data = {}  # a section whose every line is commented out: all defaults
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {type(data).__name__}")
        data = {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {'.'.join(filter(None, [prefix, close[0]]))!r}?" if close else \
                f"; valid keys here: {', '.join(names)}"
            problems.append(f"{dotted}: unknown key{hint}")
            continue
        ok, converted = _convert(hints[key], value, dotted, problems)
        if ok:
            kwargs[key] = converted
    obj = cls(**kwargs)
    if own and problems:
        raise ConfigError(problems)
    return obj


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, dotted: str, problems: list[str]) -> tuple[bool, Any]:
    """Check ``value`` against type ``tp``; return (ok, value). Appends a problem when not ok."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return True, from_dict(tp, value, dotted, problems)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            scratch: list[str] = []
            ok, converted = _convert(arm, value, dotted, scratch)
            if ok and not scratch:
                return True, converted
            if isinstance(value, dict) and (dataclasses.is_dataclass(arm) or typing.get_origin(arm) is dict):
                problems.extend(scratch)  # a mapping was meant for this arm: its own problems say more
                return False, None
    elif origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return True, value
        close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"{dotted}: {value!r} is not one of {_type_name(tp)}{hint}")
        return False, None
    elif origin is list:
        if isinstance(value, str):
            value = [value]  # one source given as a scalar
        if isinstance(value, list):
            (arm,) = typing.get_args(tp)
            out, good = [], True
            for i, item in enumerate(value):
                ok, converted = _convert(arm, item, f"{dotted}[{i}]", problems)
                good &= ok
                out.append(converted)
            return good, out
    elif origin is dict:
        if isinstance(value, dict):
            key_tp, value_tp = typing.get_args(tp)
            out, good = {}, True
            for key, item in value.items():
                ok_key, _ = _convert(key_tp, key, f"{dotted} key {key!r}", problems)
                ok, converted = _convert(value_tp, item, f"{dotted}.{key}", problems)
                good &= ok and ok_key
                out[key] = converted
            return good, out
    elif tp is type(None):
        if value is None:
            return True, None
    elif tp is Any:
        return True, value
    elif tp is bool:
        if isinstance(value, bool):
            return True, value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return True, value
    problems.append(f"{dotted}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return False, None


def _get_dotted(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
