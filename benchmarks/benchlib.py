"""Shared pieces of the side-by-side benchmarks: workspace, data, launching, step timing, statistics.

Every benchmark starts both sides with the same `deepspeed --num_gpus N` launcher, reads each side's
per-step completion lines from stdout as they arrive, and stamps them with this process's monotonic clock.
Steady-state throughput is then one rule for every side:

    supervised tokens of steps W+1 .. N  /  (stamp of step N - stamp of step W)

with W warm-up steps skipped (start-up, first-iteration allocation, JIT builds), so nothing before the end of
step W and nothing after step N (final evaluation, saving) is counted.

On a shared machine the wall clock also measures everyone else's load, which can change several-fold within
a minute. So at every stamped step line the harness also reads the CPU seconds (user + system) consumed so
far by the side's whole process tree, and reports tokens per CPU-second of the same window beside the
wall-clock figure: the work each side needs per token, which background load barely moves.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
SAMPLE_CSV = REPO_ROOT / "examples" / "data" / "data_science_questions.csv"
TRAIN_SCRIPT = REPO_ROOT / "training" / "train.py"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from training import remove_allreduce_buffers  # noqa: E402  (light: no torch)

# zerotune's rank-0 line after each optimizer step: "step      5/20 | loss ...".
ZEROTUNE_STEP = re.compile(r"^step\s+(\d+)/(\d+) \| loss")
# The peers (Trainer, bare DeepSpeed) print "benchstep <n>" from rank 0 after each optimizer step.
PEER_STEP = re.compile(r"^benchstep (\d+)\b")


# --------------------------------------------------------------------------- workspace and data


def model_dir(work: Path, hidden_size: int = 256, num_layers: int = 4, vocab_size: int = 2048) -> Path:
    """The benchmark model: a random-init Llama (tokenizer trained on the bundled sample), built once."""
    from training.tiny_model import write_tiny_model

    out = work / f"model-h{hidden_size}-l{num_layers}{'' if vocab_size == 2048 else f'-v{vocab_size}'}"
    if not (out / "config.json").is_file():
        write_tiny_model(out, [str(SAMPLE_CSV)], vocab_size=vocab_size, hidden_size=hidden_size,
                         num_layers=num_layers, seed=0)
    return out


def model_params(model: Path) -> int:
    """Parameters of a model written by :func:`model_dir` (recorded beside it by ``zerotune tiny-model``)."""
    return json.loads((model / "zerotune_tiny.json").read_text(encoding="utf-8"))["params"]


def _sample_rows() -> list[dict]:
    with open(SAMPLE_CSV, newline="", encoding="utf-8") as fh:
        return [r for r in csv.DictReader(fh) if r["question"].strip() and r["answer"].strip()]


def write_variable_sft_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """Question/answer rows whose answers join 1 to 7 sample answers (drawn log-uniformly), so templated
    lengths spread from ~30 to ~500 tokens like real SFT data: many short answers, a long tail."""
    sample, rng = _sample_rows(), random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["question", "answer"])
        writer.writeheader()
        for i in range(rows):
            k = min(7, int(round(2 ** rng.uniform(0, 2.9))))
            picks = rng.sample(sample, k)
            question = picks[0]["question"] if k == 1 else f"{picks[0]['question']} Also cover {k - 1} related points."
            writer.writerow({"question": question, "answer": " ".join(p["answer"] for p in picks)})
    return path


def write_long_text_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """`text` rows each far longer than the sequence length (sample answers joined in random order);
    prep truncates each to exactly seq_len tokens, so every sequence is one full document, no padding."""
    sample, rng = _sample_rows(), random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text"])
        writer.writeheader()
        for _ in range(rows):
            picks = rng.sample(sample, 40)
            writer.writerow({"text": " ".join(f"{p['question']} {p['answer']}" for p in picks)})
    return path


def prepare_data(csv_path: Path, out_dir: Path, model: Path, seq_len: int, record_type: str) -> dict:
    """`zerotune prep` on ``csv_path`` (cached by its own cache key); returns the manifest."""
    from data_prep.config import DataConfig
    from data_prep.pipeline import prepare

    text = record_type == "text"
    cfg = DataConfig(sources=[str(csv_path)], output_dir=str(out_dir), seq_len=seq_len, record_type=record_type,
                     prompt_column="question", response_column="answer", text_column="text", template="chat",
                     excess_length="truncate", packing=True, validation_fraction=0.0 if text else 0.05,
                     test_fraction=0.0, num_shards=2)
    return prepare(cfg, str(model))


def split_documents(data_dir: Path, manifest: dict, split: str) -> list[dict]:
    """Every document of ``split`` in stored order, unpacked at ``position_ids == 0``, as int64 arrays."""
    from data_prep.format import Shard

    docs = []
    for info in manifest["splits"][split]["shards"]:
        shard = Shard.open(data_dir, split, info["name"])
        for i in range(len(shard)):
            ids, labels, pos = (np.asarray(a, dtype=np.int64) for a in shard.sequence(i))
            starts = list(np.flatnonzero(pos == 0)) + [len(ids)]
            for lo, hi in zip(starts[:-1], starts[1:]):
                docs.append({"input_ids": ids[lo:hi], "labels": labels[lo:hi]})
    return docs


# --------------------------------------------------------------------------- launching and step stamps


@dataclass
class Run:
    """One launched side: its stdout stamped per line, the stamps of its step lines, and its exit code."""

    name: str
    launched_at: float
    step_stamps: dict[int, float] = field(default_factory=dict)
    step_cpu_seconds: dict[int, float] = field(default_factory=dict)
    returncode: int | None = None
    log_path: Path | None = None

    def first_step_seconds(self) -> float:
        """Launch to the end of the first optimizer step this process ran."""
        return self.step_stamps[min(self.step_stamps)] - self.launched_at


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_env() -> dict:
    """Environment for every side: one intra-op thread per rank (2 ranks on 2 cores; no oversubscription),
    CPU accelerator, repository importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=env.get("BENCH_OMP_THREADS", "1"), DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO_ROOT))
    return env


def launch(name: str, script: Path, args: list[str], log_path: Path, ranks: int = 2,
           pattern: re.Pattern = PEER_STEP, timeout_s: float = 900) -> Run:
    """Run ``deepspeed --num_gpus ranks script args`` to the end, stamping step lines as they arrive."""
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), str(script), *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run = Run(name=name, launched_at=time.monotonic(), log_path=log_path)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                cwd=REPO_ROOT, env=bench_env())
        tree = psutil.Process(proc.pid)
        for line in proc.stdout:
            now = time.monotonic()
            log.write(f"{now - run.launched_at:9.3f} {line}")
            match = pattern.match(line.strip())
            if match:
                run.step_stamps[int(match.group(1))] = now
                run.step_cpu_seconds[int(match.group(1))] = tree_cpu_seconds(tree)
            if now - run.launched_at > timeout_s:
                proc.kill()
        run.returncode = proc.wait()
    remove_allreduce_buffers(port)  # DeepSpeed leaves ~69 MB per rank in /dev/shm
    if run.returncode != 0:
        tail = "".join(log_path.read_text(encoding="utf-8").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{name} exited {run.returncode}; log {log_path}:\n{tail}")
    return run


def tree_cpu_seconds(root: "psutil.Process") -> float:
    """User + system CPU seconds used so far by ``root`` and every live descendant."""
    total = 0.0
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return float("nan")
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def log_line_seconds(log_path: Path, text: str) -> float:
    """Seconds after launch at which the first line containing ``text`` arrived (from launch()'s log)."""
    for line in log_path.read_text(encoding="utf-8").splitlines()[1:]:
        stamp, _, rest = line.strip().partition(" ")
        if text in rest:
            return float(stamp)
    raise RuntimeError(f"no line containing {text!r} in {log_path}")


def window_cpu_seconds(run: Run, warmup_steps: int, last_step: int) -> float:
    """CPU seconds the side's process tree used from the end of step ``warmup_steps`` to step ``last_step``."""
    return run.step_cpu_seconds[last_step] - run.step_cpu_seconds[warmup_steps]


def window_seconds(run: Run, warmup_steps: int, last_step: int) -> float:
    """Seconds from the end of step ``warmup_steps`` to the end of step ``last_step``."""
    missing = [s for s in (warmup_steps, last_step) if s not in run.step_stamps]
    if missing:
        raise RuntimeError(f"{run.name}: no step line for step(s) {missing} in {run.log_path}")
    return run.step_stamps[last_step] - run.step_stamps[warmup_steps]


def zerotune_step_tokens(output_dir: Path) -> dict[int, dict[str, float]]:
    """Per-step global token counts of a zerotune run, from its metrics.jsonl (rate x step time)."""
    out = {}
    for line in (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train" and "train/step_time_sec" in rec:
            t = rec["train/step_time_sec"]
            out[rec["step"]] = {"supervised": round(rec["train/supervised_tokens_per_sec"] * t),
                                "real": round(rec["train/tokens_per_sec"] * t)}
    return out


def peer_step_tokens(output_dir: Path) -> dict[int, dict[str, float]]:
    """Per-step token counts a peer script wrote per rank (step_tokens-rank*.json), summed over ranks."""
    out: dict[int, dict[str, float]] = {}
    for path in sorted(output_dir.glob("step_tokens-rank*.json")):
        for step, counts in json.loads(path.read_text(encoding="utf-8")).items():
            slot = out.setdefault(int(step), {"supervised": 0, "real": 0, "padded": 0})
            for key, value in counts.items():
                slot[key] = slot.get(key, 0) + value
    return out


def window_tokens(per_step: dict[int, dict[str, float]], warmup_steps: int, last_step: int, key: str) -> float:
    return sum(per_step[s][key] for s in range(warmup_steps + 1, last_step + 1))


# --------------------------------------------------------------------------- statistics and reporting


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt_spread(values: list[float], digits: int = 3) -> str:
    s = spread(values)
    return f"median {s['median']:.{digits}f} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f})"


def machine() -> str:
    """A one-line description of this machine (no GPU is used by the CPU benchmarks)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU ({cpu}), {gpu}, torch {torch.__version__}"


def peer_arg_parser(description: str, data_help: str) -> "argparse.ArgumentParser":
    """The options both peers take (model, data, run length, optimizer schedule, DeepSpeed JSON, the
    launcher's --local_rank); each peer adds its batch options."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--ds-config", default=str(REPO_ROOT / "ds_configs" / "zero2.json"))
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    return p


def write_summary(path: Path, args, summary: dict) -> None:
    """Write a figure's JSON summary, headed by the script's arguments and the machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), **summary}
    path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"summary written to {path}")


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------- the zerotune side


def write_zerotune_config(path: Path, *, model: Path, data_dir: Path, manifest: dict, output_dir: Path,
                          loop: str, micro_batch_size: int, max_steps: int, lr: float, warmup_steps: int,
                          seed: int = 1234, checkpoint_every_steps: int | None = None,
                          keep_last: int = 1) -> Path:
    """A run config for training/train.py that matches the peer's settings (fp32 on CPU, ZeRO-2, cosine)."""
    import yaml

    settings = manifest["settings"]
    cfg = {
        "output_dir": str(output_dir),
        "model": {"name_or_path": str(model), "attn_implementation": "sdpa", "gradient_checkpointing": "none"},
        "data": {k: settings[k] for k in ("sources", "seq_len", "record_type", "prompt_column", "response_column",
                                          "text_column", "template", "excess_length", "packing",
                                          "validation_fraction", "test_fraction", "num_shards")}
        | {"output_dir": str(data_dir)},
        "train": {"loop": loop, "max_steps": max_steps, "micro_batch_size": micro_batch_size,
                  "gradient_accumulation_steps": 1, "precision": "fp32", "lr": lr, "lr_schedule": "cosine",
                  "warmup_steps": warmup_steps, "min_lr_ratio": 0.1, "weight_decay": 0.0, "adam_beta1": 0.9,
                  "adam_beta2": 0.95, "adam_eps": 1e-8, "grad_clip": 1.0, "seed": seed},
        "eval": {"every_steps": None, "sample_generations": 0},
        "deepspeed": {"config": "zero2.json", "timeout_minutes": 10},
        "checkpoint": {"every_steps": checkpoint_every_steps, "keep_last": keep_last, "keep_best": False},
        "logging": {"log_every_steps": 1},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run_zerotune(name: str, config: Path, log_path: Path, overrides: list[str] = (), ranks: int = 2) -> Run:
    """`deepspeed --num_gpus ranks training/train.py --config config` with step stamps."""
    args = ["--config", str(config)]
    for item in overrides:
        args += ["--set", item]
    return launch(name, TRAIN_SCRIPT, args, log_path, ranks=ranks, pattern=ZEROTUNE_STEP)


def docs_per_sequence(manifest: dict) -> float:
    train = manifest["splits"]["train"]
    return train["documents"] / train["sequences"]
