"""Cost of the per-rank heartbeat (training/heartbeat.py) on the step's hot path.

    python benchmarks/heartbeat_cost.py [--beats 5000] [--dir RUN_DIR_PARENT]

Times ``Heartbeat.beat`` (JSON record, write to a temporary file, atomic rename, re-arm the faulthandler
stall timer) against the same loop without the call, in one process, alternating blocks of beats. A step
beats 1 + 3 x gradient_accumulation_steps times; the report gives microseconds per beat and per step for
accumulation 1 and 8, to compare with a step's time (figure 3's model: ~300 ms per step on this machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
from training.heartbeat import Heartbeat  # noqa: E402

PHASES = ("forward", "backward", "step", "data")


def block_us(hb: Heartbeat | None, beats: int) -> float:
    """Microseconds per iteration of ``beats`` iterations (each beats once when ``hb`` is given)."""
    t0 = time.perf_counter()
    for i in range(beats):
        if hb is not None:
            hb.beat(i, PHASES[i % 4], micro=0)
    return (time.perf_counter() - t0) / beats * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--beats", type=int, default=5000)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--dir", default=None, help="where the run dir goes (default: the system temp folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as run_dir:
        hb = Heartbeat(run_dir, rank=0, world_size=1, stall_dump_s=600)
        with_hb, without = [], []
        for _ in range(args.blocks):
            with_hb.append(block_us(hb, args.beats // args.blocks))
            without.append(block_us(None, args.beats // args.blocks))
        hb.close()
    per_beat = statistics.median(with_hb) - statistics.median(without)
    print(f"machine: {bl.machine()}")
    print(f"run dir on: {Path(run_dir).parent}")
    print(f"per beat: {per_beat:.1f} us (median of {args.blocks} blocks; min {min(with_hb):.1f}, "
          f"max {max(with_hb):.1f})")
    for accumulation in (1, 8):
        beats = 1 + 3 * accumulation
        print(f"per step, accumulation {accumulation}: {beats} beats = {beats * per_beat / 1000:.3f} ms")


if __name__ == "__main__":
    main()
