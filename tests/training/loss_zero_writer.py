"""One SGD step of the tiny model with the plain and the chunked loss, under ZeRO-0 and ZeRO-3, on 2 ranks.

Started by tests/e2e/test_loss_zero.py as ``deepspeed --num_gpus 2 loss_zero_writer.py --model-dir M --out F``.
With SGD at lr 1000 and no clipping, (weights before - weights after) is 1000 x the rank-averaged gradient
(large against the weights, so the subtraction loses nothing that matters), and the saved weights compare
the gradients of the two losses, also under ZeRO-3 (gathered after the step).
"""

from __future__ import annotations

import argparse

import deepspeed
import numpy as np
import torch

from training.config import ModelConfig
from training.data import Collator
from training.model import load_model, packed_loss


def _batch(rank: int, vocab: int) -> dict:
    rng = np.random.default_rng(rank)
    seqs = []
    for lengths in ([5, 9, 3], [12, 2]):
        ids = rng.integers(4, vocab, sum(lengths))
        pos = np.concatenate([np.arange(n) for n in lengths])
        seqs.append({"input_ids": ids, "labels": np.where(pos == 0, -100, ids), "position_ids": pos})
    return Collator(pad_token_id=0)(seqs)


def _weights(engine) -> dict:
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {name: p.detach().clone() for name, p in params}


def one_step(model_dir: str, stage: int, chunk: int) -> tuple[dict, dict, float]:
    """(weights before, weights after, summed loss) of one step."""
    world = torch.distributed.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
          "gradient_clipping": 0.0, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    torch.manual_seed(0)
    model = load_model(ModelConfig(name_or_path=model_dir, attn_implementation="sdpa"), "fp32", ds)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e3),
                                           config=ds)
    before = _weights(engine)
    loss, _ = packed_loss(engine, _batch(torch.distributed.get_rank(), model.config.vocab_size), chunk)
    engine.backward(loss)
    engine.step()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    return before, _weights(engine), float(total)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    results = {f"stage{stage}-chunk{chunk}": one_step(args.model_dir, stage, chunk)
               for stage in (0, 3) for chunk in (0, 5)}
    if torch.distributed.get_rank() == 0:
        torch.save(results, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
