"""Peak RSS of a prep run stage by stage: where the memory goes as the data grows.

Run by hand (not a test):  python benchmarks/prep_stage_memory.py --scale 1000
(then --scale 1 for the reference). Runs `prepare` in this process on `prep_bench.py`'s enlargement of the
bundled sample (same tokenizer, seq_len 512) while a thread samples this process's resident memory every
5 ms, each sample tagged with the prep function running at that moment (innermost wins); prints the
high-water mark per stage. A stage's figure includes everything held when it ran, so compare one stage
across scales, not stages with each other.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGES = ("read_and_clean", "assign_splits", "_drop_clean_rows", "first_occurrences", "_tokenize", "column",
          "equals", "_write_split", "pack_best_fit", "write_shard", "cross_split_overlap", "_source_counts")
REPORT_STAGES = ("build_report", "plot_lengths")


def _tag(module, name: str, stage: list[str]) -> None:
    fn = getattr(module, name)

    @functools.wraps(fn)
    def tagged(*args, **kwargs):
        outer, stage[0] = stage[0], name
        try:
            return fn(*args, **kwargs)
        finally:
            stage[0] = outer

    setattr(module, name, tagged)


def _sample(stage: list[str], peaks: dict[str, int]) -> None:
    from data_prep.pages import resident_bytes

    while True:
        rss, now = resident_bytes(), stage[0]
        peaks[now] = max(peaks.get(now, 0), rss)
        time.sleep(0.005)


def main() -> None:
    """Prepare the enlarged sample once and print the peak RSS per stage, highest first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=100)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    from prep_bench import SAMPLE, enlarge

    from data_prep import pipeline, report
    from data_prep.config import DataConfig
    from training.tiny_model import write_tiny_model

    stage, peaks = ["other"], {}
    for name in STAGES:
        _tag(pipeline, name, stage)
    for name in REPORT_STAGES:
        _tag(report, name, stage)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_model(tmp / "model", [str(SAMPLE)], vocab_size=2048, hidden_size=64, num_layers=2)
        data = tmp / f"x{args.scale}.csv"
        enlarge(SAMPLE, data, args.scale)
        # num_proc 1: every stage runs in this process, the one sampled (auto would fork map workers).
        cfg = DataConfig(sources=[str(data)], output_dir=str(tmp / "out"), seq_len=512, prompt_column="question",
                         response_column="answer", validation_fraction=0.1, test_fraction=0.1, num_proc=1)
        threading.Thread(target=_sample, args=(stage, peaks), daemon=True).start()
        pipeline.prepare(cfg, str(model), force=True)
        time.sleep(0.05)
    print(f"scale {args.scale}x, peak RSS per stage (this process):")
    for name, peak in sorted(peaks.items(), key=lambda kv: -kv[1]):
        print(f"  {name:22s} {peak / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
