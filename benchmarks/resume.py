"""Figure 6: time from launch to the first optimizer step, resuming at 90% of an epoch against at 0%.

    python benchmarks/resume.py            # 5 pairs (short runs; start-up noise needs more than 3)
    python benchmarks/resume.py --quick    # 1 pair

A setup run (cached in the work folder) trains zerotune on the figure-1 SFT data with ``--micro`` packed
sequences per rank and step, saving a checkpoint every step from the end of epoch 0 on, up to 90% of
epoch 1. Each measured run copies the run config and ONE checkpoint into a fresh output_dir and launches
`deepspeed --num_gpus 2 training/train.py` with train.max_steps = that step + 1, so it resumes, trains one
step, then evaluates and saves. Alternating: A = the checkpoint at 0% of epoch 1 (epoch 1, step_in_epoch 0),
B = the checkpoint at 90% of epoch 1. The figure is launch -> end of the first optimizer step (the rank-0
step line, stamped on arrival). Both checkpoints hold the same model and optimizer state sizes, so any
difference comes from reaching the data position. Target: B / A <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--micro", type=int, default=4, help="packed sequences per rank per step (sets the epoch length)")
    p.add_argument("--work", type=Path, default=bl.BENCH_DIR / ".work")
    p.add_argument("--quick", action="store_true", help="1 pair")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs = 1
    return args


def setup_run(args, model: Path, data_dir: Path, manifest: dict) -> tuple[Path, int, int]:
    """Train once to 90% of epoch 1; returns (run dir, step at 0% of epoch 1, step at 90% of epoch 1)."""
    from training.config import TrainConfig
    from training.steps import plan_steps

    steps_per_epoch = plan_steps(TrainConfig(micro_batch_size=args.micro), manifest["splits"]["train"]["sequences"],
                                 world_size=2).steps_per_epoch
    at_0, at_90 = steps_per_epoch, steps_per_epoch + round(0.9 * steps_per_epoch)
    run = args.work / "runs" / "resume" / f"setup-micro{args.micro}"
    from training.checkpoint import checkpoint_root, is_complete, tag_for_step

    root = checkpoint_root(run)
    if all(is_complete(root / tag_for_step(s)) and _same_data(root / tag_for_step(s), manifest) for s in (at_0, at_90)):
        return run, at_0, at_90
    bl.fresh_dir(run)
    # Checkpoints every step, keeping the last (at_90 - at_0 + 1): both wanted steps survive pruning.
    config = bl.write_zerotune_config(run / "run.yaml", model=model, data_dir=data_dir, manifest=manifest,
                                      output_dir=run, loop="sft", micro_batch_size=args.micro, max_steps=at_90,
                                      lr=3e-3, warmup_steps=5, checkpoint_every_steps=1,
                                      keep_last=at_90 - at_0 + 1)
    print(f"setup: training {at_90} steps ({steps_per_epoch} per epoch) to make the checkpoints", flush=True)
    bl.run_zerotune("setup", config, run / "stdout.log")
    missing = [s for s in (at_0, at_90) if not is_complete(root / tag_for_step(s))]
    if missing:
        raise RuntimeError(f"setup run left no complete checkpoint for step(s) {missing} in {root}")
    return run, at_0, at_90


def _same_data(folder: Path, manifest: dict) -> bool:
    """Whether a checkpoint was trained on this prepared data (the driver refuses to resume otherwise)."""
    from training.checkpoint import STATE_FILE

    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    return state.get("manifest_cache_key") == manifest.get("cache_key")


def resume_once(name: str, setup: Path, step: int, out: Path) -> dict:
    """Copy the config and the checkpoint of ``step`` into ``out`` and resume there. Returns launch -> first
    step (wall seconds, the figure), the CPU seconds the process tree used by then, and the wall seconds from
    the driver's "resumed from" line to the first step (the part a replaying loader would lengthen)."""
    from training.checkpoint import checkpoint_root, tag_for_step, write_pointer

    bl.fresh_dir(out)
    tag = tag_for_step(step)
    root = checkpoint_root(out)
    root.mkdir(parents=True)
    shutil.copytree(checkpoint_root(setup) / tag, root / tag)
    write_pointer(root, "latest", tag)
    config = out / "run.yaml"
    config.write_text((setup / "run.yaml").read_text(encoding="utf-8").replace(str(setup), str(out)),
                      encoding="utf-8")
    run = bl.run_zerotune(name, config, out / "stdout.log", overrides=[f"train.max_steps={step + 1}"])
    first = min(run.step_stamps)
    if first != step + 1:
        raise RuntimeError(f"{name}: expected to resume at step {step + 1}, first step line was {first}")
    resumed_at = bl.log_line_seconds(out / "stdout.log", "resumed from ")
    return {"first_step_sec": run.first_step_seconds(), "cpu_sec_to_first_step": run.step_cpu_seconds[first],
            "resumed_to_first_step_sec": run.step_stamps[first] - run.launched_at - resumed_at}


def main(argv=None) -> int:
    args = parse_args(argv)
    model = bl.model_dir(args.work)
    csv_path = args.work / "sft.csv"
    if not csv_path.is_file():
        bl.write_variable_sft_csv(csv_path, 1200)
    data_dir = args.work / "prepared-sft"
    manifest = bl.prepare_data(csv_path, data_dir, model, 1024, "prompt_response")
    setup, at_0, at_90 = setup_run(args, model, data_dir, manifest)
    print(f"resume at step {at_0} (0% of epoch 1) vs step {at_90} (90% of epoch 1); {bl.machine()}", flush=True)
    rows = []
    for k in range(args.pairs):
        base = args.work / "runs" / "resume" / f"pair{k}"
        a = resume_once("resume-0pct", setup, at_0, base / "at0")
        b = resume_once("resume-90pct", setup, at_90, base / "at90")
        row = {"at_0pct": a, "at_90pct": b, "ratio": b["first_step_sec"] / a["first_step_sec"],
               "cpu_ratio": b["cpu_sec_to_first_step"] / a["cpu_sec_to_first_step"]}
        rows.append(row)
        print(f"pair {k}: launch -> first step at 0%: {a['first_step_sec']:6.2f}s | at 90%: {b['first_step_sec']:6.2f}s"
              f" | ratio {row['ratio']:.3f} | CPU s to first step {a['cpu_sec_to_first_step']:.1f} vs "
              f"{b['cpu_sec_to_first_step']:.1f} (ratio {row['cpu_ratio']:.3f}) | resumed -> first step "
              f"{a['resumed_to_first_step_sec']:.2f}s vs {b['resumed_to_first_step_sec']:.2f}s", flush=True)
    ratios = [r["ratio"] for r in rows]
    print(f"at 0%:  {bl.fmt_spread([r['at_0pct']['first_step_sec'] for r in rows], 2)} s")
    print(f"at 90%: {bl.fmt_spread([r['at_90pct']['first_step_sec'] for r in rows], 2)} s")
    print(f"ratio 90%/0%: {bl.fmt_spread(ratios)}")
    print(f"ratio of CPU seconds to the first step: {bl.fmt_spread([r['cpu_ratio'] for r in rows])}")
    bl.write_summary(args.work / "results" / "resume.json", args,
                     {"steps": {"at_0pct": at_0, "at_90pct": at_90}, "pairs": rows, "ratio": bl.spread(ratios)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
