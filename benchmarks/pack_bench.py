"""Packing time and efficiency: the O(log seq_len) best-fit packer vs the counter-scan reference.

Run by hand (not a test):  python benchmarks/pack_bench.py [--docs 1000000] [--seq-len 32768] [--seed 0]

Document lengths are drawn log-normally (median seq_len / 16, sigma 1.2, clipped to 1..seq_len), a shape
like chat and instruction data; both packers get the same lengths, and the script prints each one's time,
sequences and efficiency, the speed-up, and whether the bins are identical.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.pack import pack_best_fit, pack_best_fit_scan, packing_efficiency  # noqa: E402


def main() -> None:
    """Pack the same lengths with both packers and print time, efficiency and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    lengths = np.clip(rng.lognormal(np.log(args.seq_len / 16), 1.2, args.docs), 1, args.seq_len).astype(np.int64)
    total = int(lengths.sum())
    print(f"{args.docs:,} documents, {total:,} tokens, seq_len {args.seq_len}", flush=True)
    results = {}
    for name, fn in (("scan (before)", pack_best_fit_scan), ("room index (after)", pack_best_fit)):
        t0, c0 = time.perf_counter(), time.process_time()
        bins = fn(lengths, args.seq_len)
        bins = bins.as_lists() if hasattr(bins, "as_lists") else bins
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        results[name] = (bins, seconds, cpu)
        print(f"{name:<20} {seconds:8.1f} s  {cpu:8.1f} CPU s  sequences {len(bins):,}  "
              f"efficiency {packing_efficiency(total, len(bins), args.seq_len):.6f}", flush=True)
    (old, t_old, c_old), (new, t_new, c_new) = results.values()
    print(f"speed-up {t_old / t_new:.1f}x wall, {c_old / c_new:.1f}x CPU; identical bins: {old == new}")


if __name__ == "__main__":
    main()
