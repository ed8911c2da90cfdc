"""Per-rank token balance of a training step: the layout before the global order against the one after.

    python benchmarks/balance.py [--worlds 2 4] [--micro 2] [--accumulation 2] [--before-ref main]

Prepares the bundled sample (SFT, packed, seq_len 256) into ONE shard, then, for every optimizer step of
one epoch, counts each rank's supervised tokens (labels != -100) and real tokens (attention mask) in the
batches the driver would feed it, with no training:

- before: ``training/data.py`` as of ``--before-ref`` (loaded from git): rank r reads a contiguous block
  of the split and shuffles within it. Packed bins are stored longest first, so one rank gets the long
  ones.
- after: this checkout's global order, each step's sequences dealt by supervised tokens.

Reports, per layout and world size, the per-step ratio max/min over ranks (median and worst) and the share
of steps whose ranks are within 10% of each other (max <= 1.1 x min).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import benchlib as bl


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--before-ref", default="main", help="git ref whose training/data.py is the 'before' layout")
    p.add_argument("--work", type=Path, default=bl.BENCH_DIR / ".work")
    return p.parse_args(argv)


def prepare_one_shard(work: Path) -> tuple[Path, dict]:
    from data_prep.config import DataConfig
    from data_prep.pipeline import prepare

    model = bl.model_dir(work)
    out = work / "data" / "balance-sft-1shard"
    cfg = DataConfig(sources=[str(bl.SAMPLE_CSV)], output_dir=str(out), record_type="prompt_response",
                     prompt_column="question", response_column="answer", seq_len=256, packing=True,
                     validation_fraction=0.1, test_fraction=0.1, num_shards=1)
    return out, prepare(cfg, str(model))


def load_before(ref: str):
    """``training/data.py`` at ``ref``, imported as its own module."""
    text = subprocess.run(["git", "show", f"{ref}:training/data.py"], cwd=bl.REPO_ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "data_before.py"
    path.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("data_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["data_before"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def rank_feeds(layout: str, module, data_dir: Path, manifest: dict, world: int, args) -> list:
    """Per rank, the TrainBatches the driver would build with ``module``'s layout."""
    collator = module.Collator(0)
    if layout == "before":
        return [module.TrainBatches(module.RankSequences.open(data_dir, manifest, "train", r, world), collator,
                                    args.micro, args.accumulation, args.seed, r) for r in range(world)]
    whole = module.RankSequences.open(data_dir, manifest, "train", 0, 1)
    return [module.TrainBatches(whole, collator, args.micro, args.accumulation, world, r, args.seed)
            for r in range(world)]


def step_ratios(feeds: list) -> dict[str, list[float]]:
    """Per step of epoch 0, max/min over ranks of supervised and of real tokens."""
    out = {"supervised": [], "real": []}
    for step in range(min(f.steps_per_epoch for f in feeds)):
        per_rank = [f.step_batches(0, step) for f in feeds]
        sup = [sum(int((b["labels"] != -100).sum()) for b in bs) for bs in per_rank]
        real = [sum(int(b["attention_mask"].sum()) for b in bs) for bs in per_rank]
        out["supervised"].append(max(sup) / max(1, min(sup)))
        out["real"].append(max(real) / max(1, min(real)))
    return out


def describe(ratios: list[float]) -> str:
    within = sum(r <= 1.1 for r in ratios) / len(ratios)
    return (f"max/min median {statistics.median(ratios):.3f}, worst {max(ratios):.3f}; "
            f"{100 * within:.0f}% of {len(ratios)} steps within 10%")


def main(argv=None) -> int:
    args = parse_args(argv)
    import training.data as after

    data_dir, manifest = prepare_one_shard(args.work)
    before = load_before(args.before_ref)
    print(f"machine: {bl.machine()}")
    print(f"data: {manifest['splits']['train']['sequences']} training sequences, one shard; micro {args.micro} x "
          f"accumulation {args.accumulation} per rank")
    for world in args.worlds:
        for layout, module in (("before", before), ("after", after)):
            ratios = step_ratios(rank_feeds(layout, module, data_dir, manifest, world, args))
            print(f"world {world} {layout:>6}: supervised tokens {describe(ratios['supervised'])}")
            print(f"world {world} {layout:>6}: real tokens       {describe(ratios['real'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
