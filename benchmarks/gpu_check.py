"""The GPU check of the training step: gpu tests, then a ~1B Llama at seq 2048 under ZeRO-2 and ZeRO-3.

    python benchmarks/gpu_check.py OUT_DIR            # one H100/H200, < 8 minutes
    python benchmarks/gpu_check.py OUT_DIR --tiny     # the same plumbing on a CPU machine, a tiny model

Writes, under OUT_DIR: ``gpu_tests.json`` (the ``gpu``-marked tests: counts and the output's tail), one
``cases/<name>.json`` per training run, and ``results.json`` (every case and the targets). Each case is a
real ``deepspeed --num_gpus 1 training/train.py`` run on packed SFT data (the bundled sample, enlarged,
``zerotune prep`` at seq_len 2048), a random-init model of Llama-3.2-1B's shape (hidden 2048, 16 layers,
32 heads, 8 KV heads, 128,256-token vocabulary), bf16, micro-batch 4, no activation checkpointing. Per
case: tokens/s and MFU (the driver's train/ scalars, median over the steps after warm-up), peak GPU memory
(max_memory_allocated), and `zerotune plan`'s per-GPU total for that stage (launcher.plan.make_plan with
this GPU's memory), with the ratio. Cases: attention auto / flex_attention / sdpa with the chunked loss
and auto with the plain loss at ZeRO-2; auto (chunked and plain) at ZeRO-3. Targets (issue): MFU >= 45%
at ZeRO-2 (auto, chunked); ZeRO-3 tokens/s within 10% of ZeRO-2's; plan within 10% of the measured peak.
With 2+ GPUs, case ``z3-auto-chunked-sp2`` runs
the ZeRO-3 case on 2 GPUs as one sequence-parallel group (``train.sequence_parallel_size: 2``, the same global
batch): its per-GPU peak memory and tokens/s against ``z3-auto-chunked`` (on one GPU it is recorded as "not
applicable"). A case past the time budget is recorded as skipped rather than overrunning it. Each run ends with the
driver's final checkpoint (~15 GB for 1B parameters with AdamW states), so run folders go to ``--runs-dir``
(default: /dev/shm, memory-backed and fast) and are deleted after each case.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

ONE_B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128_256)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=8_192)
# (name, ZeRO stage, attn_implementation, train.loss_chunk_tokens)
# The targets' cases first: the time budget skips the last ones (flex compiles its kernels on first use).
CASES = [("z2-auto-chunked", 2, "auto", 1024), ("z3-auto-chunked", 3, "auto", 1024), ("z2-auto-plain", 2, "auto", 0),
         ("z2-sdpa-chunked", 2, "sdpa", 1024), ("z2-flex-chunked", 2, "flex_attention", 1024),
         ("z3-auto-plain", 3, "auto", 0)]
TINY_CASES = [("z2-auto-chunked", 2, "auto", 64), ("z2-auto-plain", 2, "auto", 0), ("z3-auto-chunked", 3, "auto", 64)]
# Sequence parallelism: (name, stage, attn, chunk, the case it is compared with); needs 2 GPUs (or --tiny: 2 CPU ranks).
SP_CASE = ("z3-auto-chunked-sp2", 3, "auto", 1024, "z3-auto-chunked")
SP_SIZE = 2
WARMUP_STEPS = 4


def run_gpu_tests(out: Path) -> dict:
    """``pytest -m gpu`` over tests/ (CI unset: a test whose package is absent skips and says so)."""
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "tests/"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    text = proc.stdout + proc.stderr
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
    result = {"returncode": proc.returncode, "counts": counts, "seconds": round(time.monotonic() - t0, 1),
              "tail": text[-6000:]}
    (out / "gpu_tests.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def write_model(path: Path, shape: dict) -> Path:
    """A random-init Llama of ``shape`` with the bundled sample's tokenizer (token ids < its 2,048 entries;
    the embedding and LM head have the full vocabulary, so the logits are full size)."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchlib import SAMPLE_CSV
    from training.tiny_model import train_tokenizer

    tokenizer = train_tokenizer([str(SAMPLE_CSV)], vocab_size=2048)
    config = LlamaConfig(**shape, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def write_config(path: Path, *, model: Path, data_dir: Path, manifest: dict, out: Path, stage: int, attn: str,
                 chunk: int, tiny: bool, steps: int, sequence_parallel: int = 1) -> Path:
    import yaml

    settings = manifest["settings"]
    cfg = {
        "output_dir": str(out),
        "model": {"name_or_path": str(model), "attn_implementation": attn, "gradient_checkpointing": "none"},
        "data": {k: settings[k] for k in ("sources", "seq_len", "record_type", "prompt_column", "response_column",
                                          "text_column", "template", "excess_length", "packing",
                                          "validation_fraction", "test_fraction", "num_shards")}
        | {"output_dir": str(data_dir)},
        "train": {"loop": "sft", "max_steps": steps, "micro_batch_size": 4, "gradient_accumulation_steps": 1,
                  "precision": "fp32" if tiny else "bf16", "lr": 1e-5, "warmup_steps": 0,
                  "loss_chunk_tokens": chunk, "sequence_parallel_size": sequence_parallel},
        "eval": {"every_steps": None, "sample_generations": 0, "max_batches": 1},
        "deepspeed": {"config": f"zero{stage}.json", "zero_stage": stage, "timeout_minutes": 10},
        "checkpoint": {"every_steps": None, "keep_best": False, "keep_last": 1},
        "logging": {"log_every_steps": 1},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def planned_gb(config: Path, gpus: int = 1) -> dict:
    """`zerotune plan` for this config on ``gpus`` GPUs of this machine's memory: the configured stage's total."""
    import torch

    from launcher.plan import make_plan
    from training.config import load_config

    cfg = load_config(config)
    memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80.0
    plan = make_plan(cfg, num_nodes=1, gpus_per_node=gpus, gpu_memory_gb=memory_gb)
    est = next(s for s in plan.stages if s.stage == cfg.deepspeed.zero_stage and not s.offload)
    return {"total_gb": est.total_gb, "model_states_gb": est.model_states_gb, "activations_gb": est.activations_gb,
            "logits_gb": est.logits_gb, "overhead_gb": est.overhead_gb, "attention": plan.step["attention"]}


def run_case(config: Path, log: Path, tiny: bool, timeout_s: float, ranks: int = 1) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    if tiny:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2")
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(29600 + os.getpid() % 300),
           str(REPO / "training" / "train.py"), "--config", str(config)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, code = f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout_s:.0f} s", 124
    log.write_text(text if isinstance(text, str) else text.decode(errors="replace"), encoding="utf-8")
    return code, log.read_text(encoding="utf-8")


def measured(run_dir: Path) -> dict:
    """Medians over the steps after warm-up, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [r for r in rows if r["kind"] == "train" and r["step"] > WARMUP_STEPS] or \
        [r for r in rows if r["kind"] == "train"]
    med = lambda key: statistics.median(r[key] for r in train) if all(key in r for r in train) else None  # noqa: E731
    return {"steps": len(train), "tokens_per_sec": med("train/tokens_per_sec"), "mfu": med("train/mfu"),
            "step_time_sec": med("train/step_time_sec"), "loss_last": train[-1]["train/loss"],
            "peak_memory_gb": max(r["train/memory_gb"] for r in train)}


def targets(cases: dict) -> dict:
    """The issue's targets, each with the figures it compares (None where a case is missing)."""
    def get(name, key):
        return (cases.get(name) or {}).get("measured", {}).get(key)

    z2, z3 = get("z2-auto-chunked", "tokens_per_sec"), get("z3-auto-chunked", "tokens_per_sec")
    mfu = get("z2-auto-chunked", "mfu")
    plan_ratios = {n: c["plan"]["total_gb"] / c["measured"]["peak_memory_gb"]
                   for n, c in cases.items() if c.get("measured") and c["measured"]["peak_memory_gb"]}
    sp_name, *_, sp_base = SP_CASE
    sp_peak, base_peak = get(sp_name, "peak_memory_gb"), get(sp_base, "peak_memory_gb")
    sp = {"peak_per_gpu_sp2_over_one_gpu": sp_peak / base_peak if sp_peak and base_peak else None,
          "tokens_per_sec_sp2_over_one_gpu": (get(sp_name, "tokens_per_sec") or 0) / z3 if z3 else None,
          "met": bool(sp_peak and base_peak and sp_peak < base_peak)}
    if "not_applicable" in (cases.get(sp_name) or {}):
        sp = {"not_applicable": cases[sp_name]["not_applicable"], "met": None}
    return {"sp2_peak_per_gpu_below_one_gpu": sp, "mfu_z2_at_least_0.45": {"mfu": mfu, "met": mfu is not None and mfu >= 0.45},
            "z3_within_10pct_of_z2": {"ratio": z3 / z2 if z2 and z3 else None,
                                      "met": bool(z2 and z3 and z3 >= 0.9 * z2)},
            "plan_within_10pct_of_peak": {"plan_over_measured": plan_ratios,
                                          "met": bool(plan_ratios) and all(0.9 <= r <= 1.1
                                                                           for r in plan_ratios.values())}}


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_one(name: str, stage: int, attn: str, chunk: int, *, model: Path, data_dir: Path, manifest: dict,
            out: Path, work: Path, args, started: float, ranks: int = 1) -> dict:
    """One training run on ``ranks`` ranks (``ranks`` > 1: one sequence-parallel group); its case record."""
    left = args.budget_s - (time.monotonic() - started)
    if left < 30:
        return {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
    run_dir = args.runs_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    config = write_config(work / "configs" / f"{name}.yaml", model=model, data_dir=data_dir, manifest=manifest,
                          out=run_dir, stage=stage, attn=attn, chunk=chunk, tiny=args.tiny, steps=args.steps,
                          sequence_parallel=ranks)
    code, text = run_case(config, out / "cases" / f"{name}.log", args.tiny, timeout_s=left, ranks=ranks)
    case = {"stage": stage, "attn_implementation": attn, "loss_chunk_tokens": chunk, "ranks": ranks,
            "sequence_parallel_size": ranks, "returncode": code,
            "first_lines": [ln for ln in text.splitlines() if ln.startswith(("attention:", "engine:"))],
            "plan": planned_gb(config, gpus=ranks)}
    if code == 0:
        case["measured"] = measured(run_dir)
        shutil.copy(run_dir / "metrics.jsonl", out / "cases" / f"{name}.metrics.jsonl")
        case["plan_over_measured"] = case["plan"]["total_gb"] / case["measured"]["peak_memory_gb"]
    else:
        case["error_tail"] = text[-3000:]
    shutil.rmtree(run_dir, ignore_errors=True)
    (out / "cases" / f"{name}.json").write_text(json.dumps(case, indent=2), encoding="utf-8")
    print(name, json.dumps({k: case.get(k) for k in ("returncode", "measured", "plan_over_measured")}), flush=True)
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the JSON results (created)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the plumbing only")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per case")
    parser.add_argument("--budget-s", type=float, default=450, help="stop starting cases after this many seconds")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--runs-dir", type=Path, default=Path("/dev/shm/zerotune-gpu-check"),
                        help="where the runs write their checkpoints (deleted after each case)")
    args = parser.parse_args()
    started = time.monotonic()
    out = args.out.resolve()
    (out / "cases").mkdir(parents=True, exist_ok=True)
    work = out / "work"
    from benchlib import machine, prepare_data, write_variable_sft_csv

    tests = None if args.skip_tests or args.tiny else run_gpu_tests(out)
    model = write_model(work / ("model-tiny" if args.tiny else "model-1b"), TINY if args.tiny else ONE_B)
    seq_len = 256 if args.tiny else 2048
    csv_path = write_variable_sft_csv(work / "sft.csv", rows=600 if args.tiny else 6000)
    data_dir = work / f"data-{seq_len}"
    manifest = prepare_data(csv_path, data_dir, model, seq_len=seq_len, record_type="prompt_response")
    cases = {}
    common = dict(model=model, data_dir=data_dir, manifest=manifest, out=out, work=work, args=args, started=started)
    for name, stage, attn, chunk in TINY_CASES if args.tiny else CASES:
        cases[name] = run_one(name, stage, attn, chunk, **common)
    name, stage, attn, chunk, _ = SP_CASE
    chunk = 64 if args.tiny else chunk  # as the tiny z3 case it is compared with
    gpus = 0 if args.tiny else _gpu_count()
    cases[name] = run_one(name, stage, attn, chunk, ranks=SP_SIZE, **common) if args.tiny or gpus >= SP_SIZE else \
        {"not_applicable": f"{gpus} GPU(s) here; sequence parallelism {SP_SIZE} needs {SP_SIZE}+"}
    results = {"machine": machine(), "tiny": args.tiny, "seconds": round(time.monotonic() - started, 1),
               "gpu_tests": tests and {k: tests[k] for k in ("returncode", "counts")}, "cases": cases,
               "targets": targets(cases)}
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(json.dumps(results["targets"], indent=2))
    print(f"results in {out / 'results.json'} ({results['seconds']} s)")


if __name__ == "__main__":
    main()
