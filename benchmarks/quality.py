"""Figure 4: validation loss of zerotune (packed) against `transformers.Trainer` (padded), same tokens seen.

    python benchmarks/quality.py            # 3 pairs (seeds 1234, 1235, 1236), one epoch each
    python benchmarks/quality.py --quick    # 1 pair, a quarter of the data

Both sides train the same random-init model on the same SFT documents (600 rows made like figure 1's)
with the same settings as figure 1 (zerotune: 1 packed sequence of <= 1024 tokens per rank and step;
Trainer: documents per packed sequence, rounded, per rank and step) for exactly one epoch each, so both
see every training document once: the same supervised tokens (the exact counts are printed; rank
balancing may repeat a sequence or two). Then each side's final weights (zerotune's checkpoint
through `zerotune export`, Trainer's `save_model`) are scored by ONE function on the same validation
documents, one document at a time, no padding: the sum of next-token cross-entropy over supervised tokens
divided by their count. Target: zerotune's loss within 2% of Trainer's (packing costs nothing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--rows", type=int, default=600, help="question/answer rows generated for this figure")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--work", type=Path, default=bl.BENCH_DIR / ".work")
    p.add_argument("--quick", action="store_true", help="1 pair, 150 rows")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.rows, args.warmup_steps = 1, 150, 2
    return args


def epoch_steps(manifest: dict, micro: int, peer_batch: int, world: int = 2) -> tuple[int, int]:
    """Optimizer steps of one epoch: zerotune (full micro-batches of its rank's sequences) and Trainer
    (the distributed sampler's ceil(documents / world) per rank, in batches of ``peer_batch``)."""
    train = manifest["splits"]["train"]
    zerotune = -(-train["sequences"] // world) // micro
    trainer = -(-(-(-train["documents"] // world)) // peer_batch)
    return zerotune, trainer


def validation_loss(model_dir: Path, docs: list[dict]) -> tuple[float, int]:
    """Mean next-token cross-entropy over the supervised tokens of ``docs``, each run alone; (loss, tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids = torch.from_numpy(doc["input_ids"]).unsqueeze(0)
            labels = torch.from_numpy(doc["labels"]).unsqueeze(0)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            targets = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    return total / count, count


def one_pair(args, k: int, model: Path, data_dir: Path, manifest: dict, peer_batch: int, val_docs) -> dict:
    from training.export import export_checkpoint

    zt_steps, hf_steps = epoch_steps(manifest, args.micro, peer_batch)
    seed = 1234 + k
    runs = args.work / "runs" / "quality" / f"pair{k}"
    zt_out, hf_out = bl.fresh_dir(runs / "zerotune"), bl.fresh_dir(runs / "trainer")
    config = bl.write_zerotune_config(zt_out / "run.yaml", model=model, data_dir=data_dir, manifest=manifest,
                                      output_dir=zt_out, loop="sft", micro_batch_size=args.micro,
                                      max_steps=zt_steps, lr=args.lr, warmup_steps=args.warmup_steps, seed=seed)
    bl.run_zerotune("zerotune", config, zt_out / "stdout.log")
    bl.launch("trainer", bl.BENCH_DIR / "hf_trainer.py",
              ["--model", str(model), "--data", str(data_dir), "--out", str(hf_out), "--mode", "sft",
               "--batch-size", str(peer_batch), "--max-steps", str(hf_steps), "--lr", str(args.lr),
               "--warmup-steps", str(args.warmup_steps), "--seed", str(seed), "--save-model"],
              hf_out / "stdout.log")
    export_checkpoint(zt_out, zt_out / "exported")
    row = {"seed": seed}
    for side, folder, tokens, steps in (("zerotune", zt_out / "exported", bl.zerotune_step_tokens(zt_out), zt_steps),
                                        ("trainer", hf_out / "model", bl.peer_step_tokens(hf_out), hf_steps)):
        loss, scored = validation_loss(folder, val_docs)
        row[side] = {"validation_loss": loss, "validation_tokens": scored, "steps": steps,
                     "supervised_tokens_trained": bl.window_tokens(tokens, 0, steps, "supervised")}
    row["loss_ratio"] = row["zerotune"]["validation_loss"] / row["trainer"]["validation_loss"]
    row["token_ratio"] = row["zerotune"]["supervised_tokens_trained"] / row["trainer"]["supervised_tokens_trained"]
    z, t = row["zerotune"], row["trainer"]
    print(f"pair {k} (seed {seed}): zerotune val loss {z['validation_loss']:.4f} after "
          f"{z['supervised_tokens_trained']:.0f} supervised tokens | trainer {t['validation_loss']:.4f} after "
          f"{t['supervised_tokens_trained']:.0f} | loss ratio {row['loss_ratio']:.4f}", flush=True)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    model = bl.model_dir(args.work)
    csv_path = args.work / f"sft-quality-{args.rows}.csv"
    if not csv_path.is_file():
        bl.write_variable_sft_csv(csv_path, args.rows, seed=1)
    data_dir = args.work / f"prepared-sft-quality-{args.rows}"
    manifest = bl.prepare_data(csv_path, data_dir, model, 1024, "prompt_response")
    peer_batch = max(1, round(args.micro * bl.docs_per_sequence(manifest)))
    val_docs = bl.split_documents(data_dir, manifest, "validation")
    zt_steps, hf_steps = epoch_steps(manifest, args.micro, peer_batch)
    print(f"{len(val_docs)} validation documents; one epoch: zerotune {zt_steps} steps of {args.micro} packed "
          f"sequence(s)/rank, Trainer {hf_steps} steps of {peer_batch} documents/rank; {bl.machine()}", flush=True)
    rows = [one_pair(args, k, model, data_dir, manifest, peer_batch, val_docs) for k in range(args.pairs)]
    ratios = [r["loss_ratio"] for r in rows]
    print(f"zerotune val loss: {bl.fmt_spread([r['zerotune']['validation_loss'] for r in rows], 4)}")
    print(f"trainer  val loss: {bl.fmt_spread([r['trainer']['validation_loss'] for r in rows], 4)}")
    print(f"loss ratio zerotune/trainer: {bl.fmt_spread(ratios, 4)}")
    print(f"supervised-token ratio zerotune/trainer: {bl.fmt_spread([r['token_ratio'] for r in rows], 4)}")
    bl.write_summary(args.work / "results" / "quality.json", args,
                     {"peer_batch_documents": peer_batch, "pairs": rows, "loss_ratio": bl.spread(ratios)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
