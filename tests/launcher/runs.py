"""Run configs for launcher tests: tiny model, bundled sample prepared once, small fast settings.

Shared by tests/launcher and tests/e2e (each conftest loads this file by path).
"""

from __future__ import annotations

from pathlib import Path

import yaml

# One rank per node, CPU, ZeRO-3: small enough for 2 cores, long enough to interrupt mid-run.
BASE = {
    "model": {"attn_implementation": "sdpa", "gradient_checkpointing": "none"},
    "data": {"record_type": "prompt_response", "prompt_column": "question", "response_column": "answer",
             "template": "chat", "seq_len": 128, "packing": True, "validation_fraction": 0.1,
             "test_fraction": 0.1, "num_shards": 2},
    "train": {"loop": "sft", "max_steps": 12, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
              "precision": "fp32", "lr": 1.0e-3, "lr_schedule": "constant", "warmup_steps": 0, "seed": 7},
    "eval": {"every_steps": None, "sample_generations": 0, "early_stopping_patience": None},
    "deepspeed": {"config": "zero3.json", "timeout_minutes": 2},
    "checkpoint": {"every_steps": 2, "keep_last": 2, "keep_best": False},
    "logging": {"log_every_steps": 1},
}


def _merge(base: dict, over: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def run_dict(model_dir: Path, csv: Path, data_dir: Path, output_dir: Path, **sections) -> dict:
    """The run config as a dict; ``sections`` override parts of BASE (e.g. train={"max_steps": 4})."""
    raw = _merge(BASE, {"output_dir": str(output_dir), "model": {"name_or_path": str(model_dir)},
                        "data": {"sources": [str(csv)], "output_dir": str(data_dir)}})
    return _merge(raw, sections)


def write_run_yaml(path: Path, raw: dict) -> Path:
    """Write ``raw`` as YAML and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def prepare_tiny(root: Path, model_dir: Path, csv: Path) -> Path:
    """Prepare the sample with the tiny tokenizer under ``root/prepared``; returns that folder."""
    from data_prep.pipeline import prepare
    from training.config import config_from_dict

    data_dir = root / "prepared"
    cfg = config_from_dict(run_dict(model_dir, csv, data_dir, root / "unused"))
    prepare(cfg.data, tokenizer_path=str(model_dir))
    return data_dir
