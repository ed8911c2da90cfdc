"""What saving the best validation weights costs: a full ZeRO checkpoint (before) against weights only (after).

    python benchmarks/best_save.py                       # 184M model (hidden 1024, 16 layers), bf16, ZeRO-3
    python benchmarks/best_save.py --layers 2 --hidden 128 --vocab 2048     # quick

Two ranks build the model with training.model.load_model under ZeRO-3, take one AdamW step on a random
batch, then save, alternating for ``--pairs`` pairs: ``engine.save_checkpoint`` + ``mark_complete`` (what
a new best cost before) and ``training.best_weights.save_best_weights`` (after). Rank 0 prints each save's
wall time (between barriers) and the bytes it wrote.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LINE = re.compile(r"bestsave (\{.*\})")
NO_STEPS = re.compile(r"(?!)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / ".work")
    p.add_argument("--rank-model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def rank_main(args) -> None:
    """One rank: build, step once, then time the two kinds of save."""
    import deepspeed
    import torch

    from training import checkpoint as ckpt
    from training.best_weights import save_best_weights
    from training.config import ModelConfig
    from training.model import load_model

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds_config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1,
                 "gradient_accumulation_steps": 1, "train_batch_size": world,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    if args.precision == "bf16":
        ds_config["bf16"] = {"enabled": True}
    model = load_model(ModelConfig(name_or_path=args.rank_model), args.precision, ds_config)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    ids = torch.randint(5, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    root = Path(args.rank_model).parent / "runs" / "best-save" / Path(args.rank_model).name
    for pair in range(args.pairs):
        for side in ("full", "weights_only"):
            if rank == 0:
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir(parents=True)
            torch.distributed.barrier()
            start = time.perf_counter()
            if side == "full":
                engine.save_checkpoint(str(root), tag="step-00000001", save_latest=False)
                torch.distributed.barrier()
                if rank == 0:
                    ckpt.mark_complete(root / "step-00000001")
                folder = root / "step-00000001"
            else:
                folder = save_best_weights(engine.module, root, "step-00000001", {"step": 1}, None, rank)
            torch.distributed.barrier()
            seconds = time.perf_counter() - start
            if rank == 0:
                print("bestsave " + json.dumps({"pair": pair, "side": side, "seconds": seconds,
                                                "bytes": _bytes(folder)}), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rank_model:
        rank_main(args)
        return 0
    import benchlib as bl

    model = bl.model_dir(args.work, args.hidden, args.layers, args.vocab)
    params = bl.model_params(model)
    log = args.work / "logs" / f"best-save-{model.name}-{args.precision}.log"
    bl.launch(f"best-save {model.name}", Path(__file__),
              ["--rank-model", str(model), "--precision", args.precision, "--pairs", str(args.pairs)],
              log, pattern=NO_STEPS)
    rows = [json.loads(m.group(1)) for m in map(LINE.search, log.read_text().splitlines()) if m]
    for row in rows:
        print(f"{model.name} ({params / 1e6:.0f}M, {args.precision}, ZeRO-3, 2 ranks) pair {row['pair']} "
              f"{row['side']:12s}: {row['seconds']:.2f} s, {row['bytes'] / 1e9:.3f} GB "
              f"({row['bytes'] / params:.1f} bytes/param)")
    for pair in range(args.pairs):
        full, weights = (next(r for r in rows if r["pair"] == pair and r["side"] == side)
                         for side in ("full", "weights_only"))
        print(f"pair {pair}: weights-only / full: time {weights['seconds'] / full['seconds']:.3f}, "
              f"size {weights['bytes'] / full['bytes']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
