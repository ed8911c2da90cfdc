"""The floor for figure 3: a bare DeepSpeed loop, nothing but `deepspeed.initialize`, forward, backward, step.

    deepspeed --num_gpus 2 benchmarks/bare_deepspeed.py --model M --data PREPARED --out DIR --micro 1 \
        --max-steps N

It feeds the very sequences zerotune's driver feeds, in the same order (the same rank assignment and
per-epoch permutation), but every batch is built into tensors before the first step, so the timed loop has
no data loading at all. Meant for full fixed-length data (every sequence one document of seq_len tokens,
no padding): the model's own causal attention and mean loss over tokens 1..T-1 then do exactly the
work zerotune's pretrain loop does. Same model, ZeRO-2 JSON, AdamW and LR schedule as the other sides.

Rank 0 prints ``benchstep <n>`` after every optimizer step; each rank writes ``step_tokens-rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import peer_arg_parser  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = peer_arg_parser(__doc__.splitlines()[0], "a zerotune prep output folder of full fixed-length sequences")
    p.add_argument("--micro", type=int, default=1, help="sequences per rank per optimizer step")
    return p.parse_args(argv)


def build_batches(data_dir: str, rank: int, world: int, micro: int, steps: int, seed: int):
    """``steps`` batches of [micro, seq_len] input_ids, in zerotune's order for this rank (epoch after epoch)."""
    import numpy as np
    import torch

    from data_prep.format import load_manifest
    from training.data import Collator, RankSequences, TrainBatches

    manifest = load_manifest(data_dir)
    whole = RankSequences.open(data_dir, manifest, "train", rank=0, world_size=1)
    data = TrainBatches(whole, Collator(0), micro, 1, world, rank, seed)
    batches = []
    for step in range(steps):
        epoch, k = divmod(step, data.steps_per_epoch)
        rows = [np.asarray(whole.get(j)["input_ids"], dtype=np.int64) for j in data.step_sequences(epoch, k)[rank]]
        if len({len(r) for r in rows}) != 1:
            raise SystemExit("bare_deepspeed.py needs full fixed-length sequences (prep text with truncation)")
        batches.append(torch.from_numpy(np.stack(rows)))
    return batches


def main(argv=None) -> int:
    args = parse_args(argv)
    import datetime

    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from training.engine import lr_multiplier

    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    ds_config = json.loads(Path(args.ds_config).read_text(encoding="utf-8"))
    ds_config.update(train_micro_batch_size_per_gpu=args.micro, gradient_accumulation_steps=1,
                     train_batch_size=args.micro * world, gradient_clipping=1.0, zero_allow_untested_optimizer=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        opt, lambda s: lr_multiplier(s, args.max_steps, args.warmup_steps, "cosine", args.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, lr_scheduler=schedule)
    batches = build_batches(args.data, rank, world, args.micro, args.max_steps, args.seed)
    per_step = {}
    engine.train()
    for step, input_ids in enumerate(batches, start=1):
        loss = engine(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        per_step[step] = {"supervised": input_ids.shape[0] * (input_ids.shape[1] - 1), "real": input_ids.numel(),
                          "padded": input_ids.numel()}
        if rank == 0:
            print(f"benchstep {step} loss {loss.item():.4f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_tokens-rank{rank}.json").write_text(json.dumps(per_step), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
