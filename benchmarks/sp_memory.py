"""Peak memory per rank of one training step at a long sequence: sequence parallelism 1 against 2.

    python benchmarks/sp_memory.py [--tokens 16384] [--doc-tokens 2048] [--dtype fp32]

Each case runs in fresh processes (peak resident memory only grows within a process): SP=1 is one process
with the whole packed row, SP=2 is two gloo processes (one sequence-parallel group, training.sequence_parallel)
holding half of it each. The model is a small random-init Llama (hidden 256, 4 layers, 8 heads, 4 KV heads,
32,000-token vocabulary, chunked loss of 1,024 tokens), the micro-batch one row of ``tokens`` tokens packed
from ``doc_tokens``-token documents, the step forward + backward through ``training.model.packed_loss``
(no DeepSpeed: ZeRO changes the model states, not the activations measured here). Per rank it prints the
RSS before the step, the peak, and the step's own memory (the difference); the activations saved for
backward (every distinct tensor storage autograd keeps, parameters excluded, counted through
``torch.autograd.graph.saved_tensors_hooks``: exact, where RSS also holds allocator slack and transients);
and `zerotune plan`'s activation + logits estimate for the same shape (launcher.plan); then the SP=2 / SP=1
ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHAPE = dict(vocab_size=32_000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, tie_word_embeddings=False)
CHUNK = 1024
MIB = 2**20


def _step(rank: int, size: int, tokens: int, doc_tokens: int, dtype_name: str, store: str, out: str) -> None:
    """One forward + backward on this rank; writes its memory figures (MiB) to ``out``.rank."""
    import numpy as np
    import psutil
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig

    from training import sequence_parallel
    from training.data import Collator
    from training.model import PRECISION_DTYPES, packed_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=PRECISION_DTYPES[dtype_name],
                                             attn_implementation="sdpa").train()
    model._zerotune_sequence_parallel = sequence_parallel.setup(size)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, SHAPE["vocab_size"], tokens)
    pos = np.arange(tokens) % doc_tokens
    batch = Collator(0)([{"input_ids": ids, "labels": np.where(pos == 0, -100, ids), "position_ids": pos}])
    # A short step first: gradients exist, so the step measured adds only what the sequence needs.
    short = Collator(0)([{"input_ids": ids[:64], "labels": ids[:64], "position_ids": np.arange(64)}])
    packed_loss(model, short, CHUNK)[0].backward()
    dist.barrier()
    before = psutil.Process().memory_info().rss
    saved = saved_activations(model)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss, count = packed_loss(model, batch, CHUNK)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    figures = {"rank": rank, "rss_before_mib": before / MIB, "peak_mib": peak / MIB,
               "step_mib": (peak - before) / MIB, "saved_mib": saved.nbytes() / MIB, "loss_sum": float(loss.detach()), "tokens_scored": int(count)}
    Path(f"{out}.{rank}").write_text(json.dumps(figures), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


class saved_activations:  # noqa: N801 - used like a function
    """Counts the distinct storages autograd saves for backward (parameters excluded)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.sizes: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    def nbytes(self) -> int:
        return sum(self.sizes.values())


def run_case(size: int, tokens: int, doc_tokens: int, dtype_name: str) -> list[dict]:
    """Start ``size`` fresh processes for one case; their figures, rank by rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank")
        mp.spawn(_step, args=(size, tokens, doc_tokens, dtype_name, os.path.join(tmp, "store"), out), nprocs=size)
        return [json.loads(Path(f"{out}.{r}").read_text(encoding="utf-8")) for r in range(size)]


def planned_mib(tokens: int, size: int, dtype_name: str) -> float:
    """`zerotune plan`'s activations + logits per rank for this shape (no checkpointing, sdpa)."""
    from launcher.plan import ModelShape, activation_bytes, logits_bytes

    shape = ModelShape(params=0, largest_layer_params=0, num_layers=SHAPE["num_hidden_layers"],
                       hidden_size=SHAPE["hidden_size"], num_heads=SHAPE["num_attention_heads"],
                       vocab_size=SHAPE["vocab_size"], model_type="llama")
    act = activation_bytes(shape, 1, tokens, "none", mixed_precision=dtype_name != "fp32", sequence_parallel=size)
    return (act + logits_bytes(shape.vocab_size, 1, tokens, CHUNK, size)) / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--doc-tokens", type=int, default=2048)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    results = {}
    for size in (1, 2):
        ranks = run_case(size, args.tokens, args.doc_tokens, args.dtype)
        worst = max(ranks, key=lambda r: r["step_mib"])
        results[size] = {"ranks": ranks, "step_mib_max_rank": worst["step_mib"], "peak_mib_max_rank": worst["peak_mib"],
                         "saved_mib_max_rank": max(r["saved_mib"] for r in ranks),
                         "plan_activations_logits_mib": planned_mib(args.tokens, size, args.dtype),
                         "loss_sum_all_ranks": sum(r["loss_sum"] for r in ranks)}
        print(f"SP={size}: " + "; ".join(f"rank {r['rank']} before {r['rss_before_mib']:.0f} MiB, peak "
                                         f"{r['peak_mib']:.0f} MiB, step {r['step_mib']:.0f} MiB, saved for backward "
                                         f"{r['saved_mib']:.0f} MiB" for r in ranks)
              + f"; plan {results[size]['plan_activations_logits_mib']:.0f} MiB", flush=True)
    one, two = results[1], results[2]
    print(json.dumps({"tokens": args.tokens, "doc_tokens": args.doc_tokens, "dtype": args.dtype,
                      "step_ratio_sp2_over_sp1": two["step_mib_max_rank"] / one["step_mib_max_rank"],
                      "saved_ratio_sp2_over_sp1": two["saved_mib_max_rank"] / one["saved_mib_max_rank"],
                      "peak_ratio_sp2_over_sp1": two["peak_mib_max_rank"] / one["peak_mib_max_rank"],
                      "plan_ratio_sp2_over_sp1": two["plan_activations_logits_mib"] / one["plan_activations_logits_mib"],
                      "loss_sum_sp1": one["loss_sum_all_ranks"], "loss_sum_sp2": two["loss_sum_all_ranks"]}, indent=2))


if __name__ == "__main__":
    main()
