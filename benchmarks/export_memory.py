"""Export host memory: peak RSS and wall time of `zerotune export`, before and after streaming, at two sizes.

    python benchmarks/export_memory.py                       # 184M (16 layers) and ~2x (32 layers)
    python benchmarks/export_memory.py --layers 2 --hidden 128 --vocab 2048   # a quick smoke run

For each size, a Llama-shaped random model (`zerotune tiny-model` shapes: hidden 1024, vocab 8000, 16 or
32 layers) is trained 2 steps with ZeRO-3 (fp32, or --train-precision bf16) on 2 CPU ranks by
training/train.py, which saves a checkpoint (cached in the work folder). Then, alternating, the export is run under `/usr/bin/time -v` with
the code of ``--before`` (default: the commit before the streaming export) and with this checkout, both
``--dtype bf16``. The training run's largest rank peak (also from `/usr/bin/time -v`, the maximum over the
launcher's children) is printed too. Baseline: a process that only imports torch, transformers and
deepspeed. Targets: peak above the baseline <= 3 bytes per parameter at 184M; the larger model's peak
less than 25% above the smaller one's.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import io
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

IMPORTS = "import torch, transformers, deepspeed"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[16, 32])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--train-precision", choices=("fp32", "bf16"), default="fp32",
                   help="precision of the 2 training steps (bf16 halves the training run's memory)")
    p.add_argument("--ranks", type=int, default=2, help="training ranks (1 fits the larger model in less RAM)")
    p.add_argument("--pairs", type=int, default=1, help="before/after pairs per size")
    p.add_argument("--before", default=None, help="git revision of the 'before' export (default: the parent "
                                                  "of the commit that added training/zero_reader.py)")
    p.add_argument("--work", type=Path, default=bl.BENCH_DIR / ".work")
    return p.parse_args(argv)


def timed(cmd: list[str], env: dict, log: Path, cwd: Path = bl.REPO_ROOT) -> dict:
    """Run ``cmd`` in ``cwd`` under /usr/bin/time -v; its peak RSS (GB) and wall seconds. (``python -m``
    puts the working directory first on sys.path: it decides which checkout's code runs.)"""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; log {log}:\n{proc.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    h, m, s = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)",
                        proc.stderr).groups()
    return {"peak_gb": kb * 1024 / 1e9, "wall_s": int(h or 0) * 3600 + int(m) * 60 + float(s)}


def before_tree(args) -> Path:
    """The 'before' revision's files, extracted once into the work folder."""
    rev = args.before or subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", "training/zero_reader.py"], cwd=bl.REPO_ROOT,
        capture_output=True, text=True, check=True).stdout.split()[-1] + "^"
    sha = subprocess.run(["git", "rev-parse", rev], cwd=bl.REPO_ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = args.work / f"tree-{sha[:12]}"
    if not (tree / "training" / "export.py").is_file():
        archive = subprocess.run(["git", "archive", sha], cwd=bl.REPO_ROOT, capture_output=True, check=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(tree)
    return tree


def trained_run(args, layers: int) -> tuple[Path, int, dict | None]:
    """A run dir with a ZeRO-3 checkpoint after 2 steps (cached); its parameter count and training peak."""
    model = bl.model_dir(args.work, args.hidden, layers, args.vocab)
    params = bl.model_params(model)
    suffix = "" if args.ranks == 2 else f"-{args.ranks}ranks"
    run = args.work / "runs" / "export-memory" / f"{model.name}-{args.train_precision}{suffix}"
    if (run / "checkpoints" / "latest").is_file():
        return run, params, None
    csv_path = bl.write_variable_sft_csv(args.work / "export-memory-sft.csv", rows=200)
    data = args.work / "data" / f"export-memory-{model.name}"
    manifest = bl.prepare_data(csv_path, data, model, seq_len=256, record_type="prompt_response")
    bl.fresh_dir(run)
    config = bl.write_zerotune_config(run / "run.yaml", model=model, data_dir=data, manifest=manifest,
                                      output_dir=run, loop="sft", micro_batch_size=1, max_steps=2, lr=1e-4,
                                      warmup_steps=0, checkpoint_every_steps=2)
    cmd = ["deepspeed", "--num_gpus", str(args.ranks), "--master_port", str(bl.free_port()), str(bl.TRAIN_SCRIPT),
           "--config", str(config), "--set", "deepspeed.config=zero3.json",
           "--set", f"train.precision={args.train_precision}"]
    print(f"training {model.name} ({params / 1e6:.0f}M parameters) 2 steps with ZeRO-3 on {args.ranks} rank(s)",
          flush=True)
    train = timed(cmd, bl.bench_env(), run / "train-time.log")
    return run, params, train


def main(argv=None) -> int:
    args = parse_args(argv)
    env = bl.bench_env()
    old = before_tree(args)
    baseline = timed([sys.executable, "-c", IMPORTS], env, args.work / "logs" / "export-baseline.log")
    print(f"import baseline: {baseline['peak_gb']:.3f} GB", flush=True)
    results = {"baseline_gb": baseline["peak_gb"], "sizes": []}
    for layers in args.layers:
        run, params, train = trained_run(args, layers)
        if train:
            print(f"  training peak (largest rank): {train['peak_gb']:.2f} GB in {train['wall_s']:.0f} s")
        size = {"layers": layers, "params": params, "train": train, "before": [], "after": []}
        for pair in range(args.pairs):
            for side, tree in (("before", old), ("after", bl.REPO_ROOT)):
                side_env = {**env, "PYTHONPATH": str(tree)}
                out = args.work / "exports" / f"{run.name}-{side}"
                cmd = [sys.executable, "-m", "launcher.cli", "export", str(run), "--out", str(out), "--dtype", "bf16"]
                figure = timed(cmd, side_env, args.work / "logs" / f"export-{run.name}-{side}-{pair}.log", cwd=tree)
                above = figure["peak_gb"] - baseline["peak_gb"]
                figure["bytes_per_param_above_baseline"] = above * 1e9 / params
                size[side].append(figure)
                print(f"{run.name} {side:6s}: peak {figure['peak_gb']:.3f} GB ({above * 1e9 / params:.2f} B/param "
                      f"above baseline), {figure['wall_s']:.1f} s", flush=True)
        results["sizes"].append(size)
    _print_ratios(results)
    bl.write_summary(args.work / "results" / "export_memory.json", args, results)
    return 0


def _print_ratios(results: dict) -> None:
    for size in results["sizes"]:
        b, a = size["before"][-1], size["after"][-1]
        print(f"{size['params'] / 1e6:.0f}M: after/before peak {a['peak_gb'] / b['peak_gb']:.3f}, "
              f"wall {a['wall_s'] / b['wall_s']:.3f}")
    if len(results["sizes"]) >= 2:
        small, large = results["sizes"][0], results["sizes"][-1]
        for side in ("before", "after"):
            print(f"{side}: larger/smaller model peak {large[side][-1]['peak_gb'] / small[side][-1]['peak_gb']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
