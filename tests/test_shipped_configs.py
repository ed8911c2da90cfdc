"""Every config the repository ships loads, and the strict loader rejects what it should.

Shipped files are found by recursive glob, so a new example or DeepSpeed JSON is tested the day it is
added. The second half pins the loader's contract: unknown keys get a did-you-mean with the dotted key,
wrong types name the key and the expected type, every problem is reported in one error, and
``--set dotted.key=value`` overrides are parsed as YAML and checked like the file itself.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from training.config import ConfigError, RunConfig, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
# Environments, caches and run outputs (all git-ignored) are not shipped files.
SKIP_DIRS = {"__pycache__", "venv", "runs", "build", "dist", "node_modules"}
SKIP_ROOT_DIRS = {"demo"}  # `make demo` writes its run here
RUN_CONFIG_SECTIONS = {"model", "data", "train"}
# Data-parallel size each multi-GPU template is written for (the arithmetic in its train comment).
TEMPLATE_DATA_PARALLEL = {"examples/llama-1b-8gpu.yaml": 2 * 8, "examples/qwen-7b-8gpu.yaml": 2 * 8}
BATCH_KEYS_OWNED_BY_YAML = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                            "train_batch_size", "gradient_clipping")


def _shipped_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        at_root = Path(dirpath) == root
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS
                             and not d.endswith(".egg-info") and not (at_root and d in SKIP_ROOT_DIRS))
        found += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(suffixes)]
    return found


def _rel(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


YAML_FILES = _shipped_files(REPO_ROOT, (".yaml", ".yml"))
DS_JSON_FILES = _shipped_files(REPO_ROOT / "ds_configs", (".json",))


def _is_run_config(raw) -> bool:
    return isinstance(raw, dict) and bool(RUN_CONFIG_SECTIONS & set(raw))


def test_discovery_finds_the_shipped_configs():
    yaml_names = {_rel(p) for p in YAML_FILES}
    assert {"examples/demo.yaml", *TEMPLATE_DATA_PARALLEL} <= yaml_names
    assert {"zero2.json", "zero3.json"} <= {p.name for p in DS_JSON_FILES}


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_shipped_yaml_loads_strictly(path, monkeypatch):
    """Run configs load strictly; validate fully when the data files they name are present."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not _is_run_config(raw):
        return  # another kind of YAML: parsing it was the whole check
    monkeypatch.chdir(REPO_ROOT)  # examples name their paths relative to the repository root
    sources = (raw.get("data") or {}).get("sources") or []
    sources = [sources] if isinstance(sources, str) else sources
    if sources and all(Path(s).exists() for s in sources):
        cfg = load_config(path, validate=True)
    else:
        # A template for a cluster: its data is not here, but every key must still parse and be complete.
        cfg = load_config(path, validate=False)
        assert cfg.ds_config_path().is_file(), f"deepspeed.config {cfg.deepspeed.config!r} not shipped"
    assert cfg.model.name_or_path and cfg.data.sources and cfg.output_dir


@pytest.mark.parametrize("rel", sorted(TEMPLATE_DATA_PARALLEL))
def test_multi_gpu_template_batch_arithmetic(rel, monkeypatch):
    """The templates' global batch equals micro x accumulation x the data-parallel size they are written for."""
    monkeypatch.chdir(REPO_ROOT)
    cfg = load_config(REPO_ROOT / rel, validate=False)
    world = TEMPLATE_DATA_PARALLEL[rel]
    t = cfg.train
    assert t.global_batch_size == t.micro_batch_size * t.gradient_accumulation_steps * world
    cfg.validate(world_size=world)
    cfg.validate(world_size=world // 2)  # half the ranks: accumulation doubles, the global batch stays
    with pytest.raises(ConfigError, match=r"train\.global_batch_size"):
        cfg.validate(world_size=world + 1)  # cannot share it equally


@pytest.mark.parametrize("path", DS_JSON_FILES, ids=_rel)
def test_shipped_deepspeed_json(path):
    """Each JSON is a DeepSpeed config whose ZeRO section DeepSpeed itself accepts."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(ds, dict) and isinstance(ds.get("zero_optimization"), dict)
    stage = ds["zero_optimization"].get("stage")
    assert isinstance(stage, int) and not isinstance(stage, bool) and 0 <= stage <= 3
    # DeepSpeed's own model forbids unknown keys, so a misspelt ZeRO option fails here, not on a cluster.
    assert DeepSpeedZeroConfig(**ds["zero_optimization"]).stage == stage
    # The YAML owns these numbers; a hand-set value in a shipped JSON would contradict it.
    for key in BATCH_KEYS_OWNED_BY_YAML:
        assert ds.get(key, "auto") == "auto", f"{key} must be \"auto\" in {path.name}"


# --------------------------------------------------------------------------- the bundled sample data


def test_bundled_sample_parses_with_its_deliberate_flaws(sample_csv):
    """The sample keeps the flaws the cleaning stage is meant to handle (see the data's commit message)."""
    with sample_csv.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 320 and set(rows[0]) == {"question", "answer"}
    pairs = [(r["question"], r["answer"]) for r in rows]
    assert len(pairs) - len(set(pairs)) == 3
    assert sum(1 for _, a in pairs if not a.strip()) == 1
    norm = [re.sub(r"\s+", " ", q).strip().lower() for q, _ in set(pairs)]
    assert len(norm) - len(set(norm)) == 2
    assert any("," in a and '"' in a and "\n" in a for _, a in pairs)


# --------------------------------------------------------------------------- strict loader, negative


BASE = {
    "output_dir": "runs/t",
    "model": {"name_or_path": "some/model"},
    "data": {"sources": ["train.csv"], "seq_len": 512},
    "train": {"micro_batch_size": 2, "gradient_accumulation_steps": 2, "lr": 1.0e-5},
}


def _write(tmp_path: Path, raw: dict | str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw), encoding="utf-8")
    return path


def _section(**sections) -> dict:
    raw = copy.deepcopy(BASE)
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def _problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides=overrides)
    return info.value.problems


def test_base_config_is_valid(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert isinstance(cfg, RunConfig) and cfg.train.lr == pytest.approx(1e-5)


def test_typo_key_gets_did_you_mean_with_dotted_key(tmp_path):
    raw = _section(train={"gradient_acumulation_steps": 4})
    (problem,) = _problems(_write(tmp_path, raw))
    assert problem.startswith("train.gradient_acumulation_steps: unknown key")
    assert "did you mean 'train.gradient_accumulation_steps'" in problem


def test_typo_section_gets_did_you_mean(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["modle"] = raw.pop("model")
    problems = _problems(_write(tmp_path, raw))
    assert any(p.startswith("modle: unknown key") and "did you mean 'model'" in p for p in problems)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    (problem,) = _problems(_write(tmp_path, _section(train={"micro_batch_size": "four"})))
    assert problem.startswith("train.micro_batch_size:")
    assert "expected int" in problem and "'four'" in problem


def test_bool_is_not_accepted_as_int(tmp_path):
    (problem,) = _problems(_write(tmp_path, _section(data={"seq_len": True})))
    assert problem.startswith("data.seq_len:") and "expected int" in problem


def test_bad_choice_lists_the_allowed_values(tmp_path):
    (problem,) = _problems(_write(tmp_path, _section(train={"precision": "bf61"})))
    assert problem.startswith("train.precision:") and "'bf16'" in problem and "did you mean" in problem


def test_all_problems_reported_in_one_error(tmp_path):
    raw = _section(train={"lrr": 1e-5, "epochs": "two", "lr_schedule": "cosin"}, data={"packng": True})
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    keys = [p.split(":")[0] for p in info.value.problems]
    assert sorted(keys) == ["data.packng", "train.epochs", "train.lr_schedule", "train.lrr"]
    message = str(info.value)
    assert str(path) in message and "4 problem(s)" in message


def test_cross_field_problems_are_collected_with_their_arithmetic(tmp_path):
    raw = _section(train={"warmup_steps": 50, "max_steps": 10}, data={"validation_fraction": 0.6,
                                                                      "test_fraction": 0.5})
    problems = _problems(_write(tmp_path, raw))
    assert any("train.warmup_steps 50 > train.max_steps 10" in p for p in problems)
    assert any("0.6 + 0.5 = 1.1" in p for p in problems)


def test_missing_required_keys_are_named(tmp_path):
    problems = _problems(_write(tmp_path, {"train": {"lr": 1.0e-5}}))
    for key in ("model.name_or_path", "data.sources"):
        assert any(p.startswith(f"{key}: required") for p in problems), key


def test_top_level_must_be_a_mapping(tmp_path):
    (problem,) = _problems(_write(tmp_path, "- just\n- a list\n"))
    assert "top level must be a mapping" in problem


def test_invalid_yaml_is_one_config_error(tmp_path):
    (problem,) = _problems(_write(tmp_path, "train: {lr: [1\n"))
    assert "is not valid YAML" in problem


# --------------------------------------------------------------------------- --set overrides


def test_overrides_are_parsed_as_yaml_and_typed(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = load_config(path, overrides=[
        "train.lr=3e-5",                  # YAML 1.1 reads this as a string; the float field converts it
        "data.seq_len=256",
        "data.packing=false",
        "eval.every_steps=null",
        "data.sources=[a.csv, b.jsonl]",
        "deepspeed.zero_stage=auto",
        "output_dir=runs/other",
    ])
    assert cfg.train.lr == pytest.approx(3e-5) and isinstance(cfg.train.lr, float)
    assert cfg.data.seq_len == 256 and cfg.data.packing is False
    assert cfg.eval.every_steps is None
    assert cfg.data.sources == ["a.csv", "b.jsonl"]
    assert cfg.deepspeed.zero_stage == "auto" and cfg.output_dir == "runs/other"


def test_override_wins_over_file_and_last_override_wins(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), overrides=["train.micro_batch_size=8",
                                                        "train.micro_batch_size=16"])
    assert cfg.train.micro_batch_size == 16
    assert cfg.train.gradient_accumulation_steps == 2  # untouched siblings keep the file's values


def test_override_creates_a_section_the_file_lacks(tmp_path):
    assert "logging" not in BASE
    cfg = load_config(_write(tmp_path, BASE), overrides=["logging.log_every_steps=7"])
    assert cfg.logging.log_every_steps == 7


def test_override_value_may_contain_equals_and_spaces(tmp_path):
    overrides = ["data.template=format", "data.format_string=Q={prompt} A={response}"]
    cfg = load_config(_write(tmp_path, BASE), overrides=overrides)
    assert cfg.data.format_string == "Q={prompt} A={response}"


def test_override_empty_value_is_empty_string(tmp_path):
    problems = _problems(_write(tmp_path, BASE), ["output_dir="])
    assert problems == ["output_dir: required, but not set"]


def test_override_without_equals_is_reported(tmp_path):
    (problem,) = _problems(_write(tmp_path, BASE), ["train.lr"])
    assert "--set 'train.lr'" in problem and "dotted.key=value" in problem


def test_override_typo_gets_did_you_mean(tmp_path):
    (problem,) = _problems(_write(tmp_path, BASE), ["train.micro_batch=4"])
    assert problem.startswith("train.micro_batch: unknown key")
    assert "did you mean 'train.micro_batch_size'" in problem


def test_override_wrong_type_names_key_and_type(tmp_path):
    (problem,) = _problems(_write(tmp_path, BASE), ["train.epochs=many"])
    assert problem.startswith("train.epochs:") and "expected int" in problem


def test_override_below_a_scalar_is_reported(tmp_path):
    (problem,) = _problems(_write(tmp_path, BASE), ["output_dir.sub=x"])
    assert "--set output_dir.sub" in problem and "not a section" in problem


def test_override_and_file_problems_reported_together(tmp_path):
    path = _write(tmp_path, _section(train={"lrr": 1e-5}))
    problems = _problems(path, ["data.seq_len=long", "eval"])
    assert len(problems) == 3
    assert any(p.startswith("train.lrr:") for p in problems)
    assert any(p.startswith("data.seq_len:") for p in problems)
    assert any("--set 'eval'" in p for p in problems)



def test_override_starting_with_hash_is_text_not_a_comment(tmp_path):
    """YAML would read '#...' as a comment and null the key without a word; the text must survive."""
    cfg = load_config(_write(tmp_path, BASE), overrides=["data.system_prompt=#1 rule: be brief",
                                                        "eval.max_batches=~"])
    assert cfg.data.system_prompt == "#1 rule: be brief"
    assert cfg.eval.max_batches is None  # a real YAML null still means null


def test_key_given_twice_is_an_error_naming_it_and_its_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("output_dir: out\ntrain:\n  lr: 1.0e-4\n  lr: 2.0e-4\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, validate=False)
    assert "'lr' appears twice" in str(info.value) and "line 4" in str(info.value)


def test_section_with_every_line_commented_out_takes_defaults(tmp_path):
    path = tmp_path / "empty_section.yaml"
    path.write_text("output_dir: out\nlogging:\n  # tensorboard_dir: tb\neval:\n", encoding="utf-8")
    cfg = load_config(path, validate=False)
    assert cfg.logging == RunConfig().logging and cfg.eval == RunConfig().eval


def test_config_error_is_marked_as_the_users():
    assert getattr(ConfigError(["x"]), "user_error", False) is True
