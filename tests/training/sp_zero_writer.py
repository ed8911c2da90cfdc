"""One SGD step of a small Llama with its packed micro-batch split over a sequence-parallel group of 2 ranks,
under ZeRO-2 and ZeRO-3, against the whole micro-batch on one process without DeepSpeed.

Started by tests/e2e/test_sequence_parallel_dist.py as
``deepspeed --num_gpus 2 sp_zero_writer.py --out F``. With SGD at lr 1000 and no clipping, (weights before -
weights after) / 1000 is the gradient DeepSpeed applied (the weights are gathered after the step under
ZeRO-3), so the file holds, per stage, that gradient and the reference gradient of every parameter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training import sequence_parallel  # noqa: E402
from training.data import Collator  # noqa: E402
from training.model import packed_loss  # noqa: E402
from tests.training.sequence_parallel_worker import ROWS, _model  # noqa: E402  (the same model and rows)

LR = 1e3


def _batch() -> dict:
    """The worker's rows; the second row's first 20 tokens are unscored, so the halves carry unequal counts."""
    rng = np.random.default_rng(0)
    seqs = []
    for row, lengths in enumerate(ROWS):
        ids = rng.integers(4, 96, sum(lengths))
        pos = np.concatenate([np.arange(n) for n in lengths])
        unscored = (pos == 0) | ((np.arange(len(ids)) < 20) & (row == 1))
        seqs.append({"input_ids": ids, "labels": np.where(unscored, -100, ids), "position_ids": pos})
    return Collator(pad_token_id=0)(seqs)


def _reference() -> dict:
    """Gradient of the mean loss over the micro-batch's supervised tokens, whole, on this process."""
    model = _model()
    loss_sum, count = packed_loss(model, _batch(), loss_chunk_tokens=0)
    (loss_sum / count).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _weights(engine) -> dict:
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {name: p.detach().clone() for name, p in params}


def split_step(stage: int, sp) -> dict:
    """The gradient DeepSpeed applies when both ranks take the one micro-batch, each its slice, normalised as
    the driver does: each rank's loss sum x world / the supervised tokens over all ranks."""
    world = dist.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
          "sequence_parallel_size": sp.size, "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True}
    model = _model()
    model._zerotune_sequence_parallel = sp
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                           config=ds)
    before = _weights(engine)
    loss_sum, count = packed_loss(engine, _batch(), loss_chunk_tokens=16)
    total = count.detach().clone().double()
    dist.all_reduce(total)
    engine.backward(loss_sum * world / total.to(loss_sum.dtype))
    engine.step()
    after = _weights(engine)
    return {name: (before[name] - after[name]) / LR for name in before}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    torch.set_num_threads(1)
    sp = sequence_parallel.setup(dist.get_world_size())
    results = {"reference": _reference(), **{f"stage{stage}": split_step(stage, sp) for stage in (2, 3)}}
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
