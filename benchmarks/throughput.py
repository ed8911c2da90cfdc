"""Figures 1 to 3: supervised tokens/s of zerotune against a peer on the same model, data and settings.

    python benchmarks/throughput.py --data sft      # 1: variable-length SFT vs Trainer (target >= 1.5x)
    python benchmarks/throughput.py --data fixed    # 2: full fixed-length text vs Trainer (target >= 0.97x)
    python benchmarks/throughput.py --data fixed --peer bare   # 3: vs a bare DeepSpeed loop (>= 0.97x)
    python benchmarks/throughput.py --data sft --quick   # smoke run: 1 pair, few steps

The peers: `transformers.Trainer` + DeepSpeed (benchmarks/hf_trainer.py, the tutorial recipe) or a bare
`deepspeed.initialize` / forward / backward / step loop over zerotune's own batches, prebuilt
(benchmarks/bare_deepspeed.py; fixed-length data only).

Both sides: the same random-init Llama (hidden 256, 4 layers), the same prepared documents, ZeRO-2, fp32,
2 CPU ranks through `deepspeed --num_gpus 2`, AdamW (0.9, 0.95), the same warmup + cosine LR schedule and
the same number of optimizer steps. Effective batch: zerotune takes ``--micro`` packed sequences of seq_len
per rank; Trainer takes ``round(micro x documents per packed sequence)`` documents per rank, so both
consume the same documents (and tokens) per step on average. The runs alternate zerotune, Trainer,
zerotune, Trainer ... (``--pairs`` pairs); each pair gives one ratio.

Throughput is steady state: the supervised tokens of steps W+1..N over the wall time between the step-W
and step-N completion lines (benchlib's rule, identical for both sides).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

DATASETS = {
    # name: (csv writer, rows, record type, seq_len, zerotune loop, peer mode)
    "sft": (bl.write_variable_sft_csv, 1200, "prompt_response", 1024, "sft", "sft"),
    "fixed": (bl.write_long_text_csv, 240, "text", 1024, "pretrain", "pretrain"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=sorted(DATASETS), default="sft")
    p.add_argument("--peer", choices=("trainer", "bare"), default="trainer")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the timed window")
    p.add_argument("--timed-steps", type=int, default=25)
    p.add_argument("--micro", type=int, default=1, help="zerotune packed sequences per rank per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--work", type=Path, default=bl.BENCH_DIR / ".work")
    p.add_argument("--quick", action="store_true", help="1 pair, 2 warm-up + 3 timed steps")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.warmup_steps, args.timed_steps = 1, 2, 3
    if args.peer == "bare" and args.data != "fixed":
        p.error("--peer bare runs on --data fixed only (the bare loop has no document masking)")
    return args


def prepare(args):
    """Model and prepared data, built once and cached in the work folder."""
    writer, rows, record_type, seq_len, _, _ = DATASETS[args.data]
    model = bl.model_dir(args.work)
    csv_path = args.work / f"{args.data}.csv"
    if not csv_path.is_file():
        writer(csv_path, rows)
    data_dir = args.work / f"prepared-{args.data}"
    manifest = bl.prepare_data(csv_path, data_dir, model, seq_len, record_type)
    return model, data_dir, manifest


def run_peer(args, model: Path, data_dir: Path, out: Path, peer_batch: int, steps: int) -> bl.Run:
    common = ["--model", str(model), "--data", str(data_dir), "--out", str(out), "--max-steps", str(steps),
              "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps)]
    if args.peer == "bare":
        return bl.launch("bare", bl.BENCH_DIR / "bare_deepspeed.py", common + ["--micro", str(args.micro)],
                         out / "stdout.log")
    mode = DATASETS[args.data][5]
    return bl.launch("trainer", bl.BENCH_DIR / "hf_trainer.py",
                     common + ["--mode", mode, "--batch-size", str(peer_batch)], out / "stdout.log")


def one_pair(args, k: int, model: Path, data_dir: Path, manifest: dict, peer_batch: int) -> dict:
    loop = DATASETS[args.data][4]
    steps, w = args.warmup_steps + args.timed_steps, args.warmup_steps
    runs = args.work / "runs" / f"throughput-{args.data}-{args.peer}" / f"pair{k}"
    zt_out, peer_out = bl.fresh_dir(runs / "zerotune"), bl.fresh_dir(runs / args.peer)
    config = bl.write_zerotune_config(zt_out / "run.yaml", model=model, data_dir=data_dir, manifest=manifest,
                                      output_dir=zt_out, loop=loop, micro_batch_size=args.micro, max_steps=steps,
                                      lr=args.lr, warmup_steps=w)
    zt = bl.run_zerotune("zerotune", config, zt_out / "stdout.log")
    peer = run_peer(args, model, data_dir, peer_out, peer_batch, steps)
    row = {"zerotune": side_figures(zt, bl.zerotune_step_tokens(zt_out), w, steps),
           "peer": side_figures(peer, bl.peer_step_tokens(peer_out), w, steps)}
    row["ratio"] = row["zerotune"]["supervised_tokens_per_sec"] / row["peer"]["supervised_tokens_per_sec"]
    row["cpu_ratio"] = row["zerotune"]["supervised_tokens_per_cpu_sec"] / row["peer"]["supervised_tokens_per_cpu_sec"]
    z, q = row["zerotune"], row["peer"]
    print(f"pair {k}: zerotune {z['supervised_tokens_per_sec']:8.1f} sup tok/s ({z['supervised_tokens']:.0f} tok "
          f"in {z['seconds']:.1f}s) | {args.peer} {q['supervised_tokens_per_sec']:8.1f} sup tok/s "
          f"({q['supervised_tokens']:.0f} tok in {q['seconds']:.1f}s, {100 * q.get('padding_fraction', 0):.0f}% "
          f"padding) | ratio {row['ratio']:.3f} | per CPU-second: zerotune {z['supervised_tokens_per_cpu_sec']:.1f}, "
          f"{args.peer} {q['supervised_tokens_per_cpu_sec']:.1f}, ratio {row['cpu_ratio']:.3f}", flush=True)
    return row


def side_figures(run: bl.Run, per_step: dict, w: int, steps: int) -> dict:
    secs = bl.window_seconds(run, w, steps)
    sup = bl.window_tokens(per_step, w, steps, "supervised")
    cpu = bl.window_cpu_seconds(run, w, steps)
    out = {"seconds": secs, "supervised_tokens": sup, "real_tokens": bl.window_tokens(per_step, w, steps, "real"),
           "supervised_tokens_per_sec": sup / secs, "cpu_seconds": cpu, "supervised_tokens_per_cpu_sec": sup / cpu,
           "first_step_after_launch_sec": run.first_step_seconds()}
    if all("padded" in per_step[s] for s in range(w + 1, steps + 1)):
        out["padding_fraction"] = 1 - out["real_tokens"] / bl.window_tokens(per_step, w, steps, "padded")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    model, data_dir, manifest = prepare(args)
    peer_batch = args.micro if args.peer == "bare" else max(1, round(args.micro * bl.docs_per_sequence(manifest)))
    train = manifest["splits"]["train"]
    print(f"data {args.data}: {train['documents']} train documents, {train['sequences']} packed sequences of "
          f"<= {manifest['seq_len']} tokens (packing efficiency {train['packing_efficiency']:.3f}); zerotune "
          f"{args.micro} sequence(s)/rank/step, {args.peer} {peer_batch} documents/rank/step; "
          f"{args.warmup_steps} warm-up + {args.timed_steps} timed steps; {bl.machine()}", flush=True)
    rows = [one_pair(args, k, model, data_dir, manifest, peer_batch) for k in range(args.pairs)]
    ratios = [r["ratio"] for r in rows]
    zt = [r["zerotune"]["supervised_tokens_per_sec"] for r in rows]
    peer = [r["peer"]["supervised_tokens_per_sec"] for r in rows]
    print(f"zerotune supervised tok/s: {bl.fmt_spread(zt, 1)}")
    print(f"{args.peer:8s} supervised tok/s: {bl.fmt_spread(peer, 1)}")
    print(f"ratio zerotune/{args.peer}: {bl.fmt_spread(ratios)}")
    cpu_ratios = [r["cpu_ratio"] for r in rows]
    print(f"ratio per CPU-second:     {bl.fmt_spread(cpu_ratios)}")
    bl.write_summary(args.work / "results" / f"throughput-{args.data}-{args.peer}.json", args,
                     {"data": args.data, "peer": args.peer, "peer_batch_documents": peer_batch, "pairs": rows,
                      "ratio": bl.spread(ratios), "cpu_ratio": bl.spread(cpu_ratios), "zerotune": bl.spread(zt),
                      "peer_rate": bl.spread(peer)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
