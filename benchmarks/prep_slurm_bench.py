"""Distributed prep on the local two-node SLURM cluster: wall time against one process, checksums, and the
packing efficiency given up by packing each hash unit on its own.

Run by hand, as root (not a test); it starts the local two-node cluster of tests/e2e/slurm_cluster.py, so
nothing else may start one at the same time:
    python benchmarks/prep_slurm_bench.py [--scale 20] [--units 4] [--seq-len 512]

Cases, on the bundled sample enlarged ``--scale`` times (prep_bench.enlarge), each a fresh output folder:
  * global: `zerotune prep CONFIG`, one process, one best-fit packer per split (the single-process layout);
  * 1 node / 2 nodes: `zerotune prep CONFIG --slurm --nodes N` (hash units, data.num_shards = --units),
    timed from submission until the job has COMPLETED.
The 1-node and 2-node outputs must have the same manifest (but time and folder) and the same shard
checksums. The packing cost is measured twice: in the runs themselves (units vs global efficiency), and
by re-packing the global run's train document lengths into 4..256 random units (what a larger
data.num_shards costs at this data size; the hash assignment is uniform like a random one).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests" / "e2e"), str(REPO_ROOT / "benchmarks")]

from prep_bench import SAMPLE, enlarge  # noqa: E402
from slurm_cluster import start_cluster, stop_cluster  # noqa: E402


def write_config(path: Path, model: Path, data: Path, out: Path, args) -> Path:
    raw = {"model": {"name_or_path": str(model)},
           "data": {"sources": [str(data)], "output_dir": str(out), "seq_len": args.seq_len,
                    "prompt_column": "question", "response_column": "answer", "num_shards": args.units,
                    "validation_fraction": 0.1, "test_fraction": 0.1}}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def time_global(config: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "launcher.cli", "prep", str(config)], check=True, cwd=REPO_ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def time_job(cluster, config: Path, nodes: int) -> float:
    t0 = time.perf_counter()
    res = cluster.run(sys.executable, "-m", "launcher.cli", "prep", str(config), "--slurm", "--nodes", str(nodes),
                      "--time", "01:00:00", timeout=300)
    job = res.stdout.split("submitted job ")[1].split(";")[0].strip()
    while True:
        state = cluster.job_state(job).get("JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        time.sleep(0.2)
    if state != "COMPLETED":
        raise SystemExit(f"job {job} ended {state}; see {config.parent}")
    log = (config.parent / "prepared.slurm" / f"zerotune-prep-{job}.out").read_text(errors="replace")
    print(f"{nodes} node(s): " + "; ".join(re.findall(r"(\w+ step [\d.]+ s)", log)), flush=True)
    return time.perf_counter() - t0


def comparable(manifest: dict) -> dict:
    out = {k: v for k, v in manifest.items() if k != "created_at"}
    out["settings"] = {k: v for k, v in manifest["settings"].items() if k != "output_dir"}
    return out


def train_lengths(data_dir: Path, manifest: dict) -> np.ndarray:
    """Token count of every train document (documents start where position_ids is 0)."""
    out = []
    for shard in manifest["splits"]["train"]["shards"]:
        pos = np.load(data_dir / "train" / f"{shard['name']}.position_ids.npy")
        starts = np.flatnonzero(pos == 0)
        out.append(np.diff(np.append(starts, len(pos))))
    return np.concatenate(out)


def unit_packing_cost(lengths: np.ndarray, seq_len: int, units_list=(4, 16, 64, 256)) -> list[tuple]:
    from data_prep.pack import pack_best_fit, packing_efficiency

    tokens = int(lengths.sum())
    global_eff = packing_efficiency(tokens, len(pack_best_fit(lengths, seq_len)), seq_len)
    rows = []
    for units in units_list:
        unit = np.random.default_rng(0).integers(0, units, size=len(lengths))
        seqs = sum(len(pack_best_fit(lengths[unit == u], seq_len)) for u in range(units))
        rows.append((units, len(lengths) / units, global_eff, packing_efficiency(tokens, seqs, seq_len)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=20)
    parser.add_argument("--units", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    from training.tiny_model import write_tiny_model

    with tempfile.TemporaryDirectory(prefix="prep-slurm-bench-") as tmp:
        tmp = Path(tmp)
        model = write_tiny_model(tmp / "model", [str(SAMPLE)], vocab_size=2048, hidden_size=64, num_layers=2)
        data = tmp / "data.csv"
        rows = enlarge(SAMPLE, data, args.scale)
        outs = {name: tmp / name / "prepared" for name in ("global", "nodes1", "nodes2")}
        for out in outs.values():
            out.parent.mkdir()
        configs = {name: write_config(out.parent / "run.yaml", model, data, out, args) for name, out in outs.items()}
        seconds = {"global": time_global(configs["global"])}
        cluster, started_munge = start_cluster(tmp / "slurm")
        try:
            for nodes in (1, 2):
                seconds[f"nodes{nodes}"] = time_job(cluster, configs[f"nodes{nodes}"], nodes)
        finally:
            stop_cluster(tmp / "slurm", started_munge)
        manifests = {name: json.loads((out / "manifest.json").read_text()) for name, out in outs.items()}
        same = comparable(manifests["nodes1"]) == comparable(manifests["nodes2"])
        checksums = [s["sha256"] for split in manifests["nodes2"]["splits"].values() for s in split["shards"]]
        print(f"{rows} rows ({args.scale}x), seq_len {args.seq_len}, {args.units} units; "
              f"{sum(s['tokens'] for s in manifests['global']['splits'].values())} tokens")
        for name, secs in seconds.items():
            effs = " ".join(f"{k} {v['packing_efficiency']:.4f} ({v['sequences']} seqs)"
                            for k, v in manifests[name]["splits"].items())
            print(f"{name:<8} {secs:7.1f} s  ({secs / seconds['global']:.2f}x global)  packing: {effs}")
        checksums1 = [s["sha256"] for split in manifests["nodes1"]["splits"].values() for s in split["shards"]]
        print(f"1 node vs 2 nodes: manifests equal (but time and folder): {same}; shard checksums equal: "
              f"{checksums == checksums1} ({len(checksums)} shards); 2 nodes / 1 node wall: "
              f"{seconds['nodes2'] / seconds['nodes1']:.2f}")
        lengths = train_lengths(outs["global"], manifests["global"])
        for units, per_unit, g, u in unit_packing_cost(lengths, args.seq_len):
            print(f"re-pack of the {len(lengths)} train documents into {units:>3} random units "
                  f"(~{per_unit:.0f} docs each): efficiency {u:.4f} vs global {g:.4f} (cost {g - u:.4f})")


if __name__ == "__main__":
    main()
