"""Two gloo ranks, one sequence-parallel group: each packed micro-batch split across both, compared in the same
processes with the whole micro-batch on one rank. Writes its measurements to a JSON file; the test asserts.

    python tests/training/sequence_parallel_worker.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.data import Collator  # noqa: E402
from training.model import flatten_batch, packed_forward, packed_loss  # noqa: E402
from training.loss import cross_entropy_sum  # noqa: E402
from training import sequence_parallel  # noqa: E402

SP = 2
# Rows of documents (lengths): the micro-batch flattens to 57 tokens, odd, so the split pads one token, and
# documents cross the slice boundary.
ROWS = [[7, 12, 5], [9, 4, 20]]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return LlamaForCausalLM(config).train()


def _batch(rows, supervised_from: int = 0, seed: int = 0) -> dict:
    """A collated micro-batch; tokens of each row before ``supervised_from`` and each document's first token
    are unscored."""
    rng = np.random.default_rng(seed)
    seqs = []
    for lengths in rows:
        ids = rng.integers(4, 96, sum(lengths))
        pos = np.concatenate([np.arange(n) for n in lengths])
        labels = np.where((pos == 0) | (np.arange(len(ids)) < supervised_from), -100, ids)
        seqs.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return Collator(pad_token_id=0)(seqs)


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _reference(model, batch) -> tuple[float, dict]:
    """The whole micro-batch on this rank: mean loss over its supervised tokens and its gradients."""
    model.zero_grad(set_to_none=True)
    loss_sum, count = packed_loss(model, batch, loss_chunk_tokens=0)
    (loss_sum / count).backward()
    return float(loss_sum.detach() / count), _grads(model)


def _split(model, batch, sp, chunk: int) -> tuple[float, dict, float]:
    """The micro-batch split over the group, normalised as the driver does (loss x world / supervised tokens
    over all ranks, gradients then averaged over ranks as DeepSpeed does); also the naive mean of per-rank
    means."""
    model._zerotune_sequence_parallel = sp
    model.zero_grad(set_to_none=True)
    loss_sum, count = packed_loss(model, batch, loss_chunk_tokens=chunk)
    totals = torch.stack([loss_sum.detach(), count.double().to(loss_sum.dtype)])
    dist.all_reduce(totals)
    world = dist.get_world_size()
    (loss_sum * world / totals[1]).backward()
    grads = _grads(model)
    for g in grads.values():
        dist.all_reduce(g)
        g.div_(world)
    naive = torch.tensor([float(loss_sum) / max(int(count), 1)])
    dist.all_reduce(naive)
    model._zerotune_sequence_parallel = None
    return float(totals[0] / totals[1]), grads, float(naive) / world


def _without_document_bounds(model, batch, sp) -> float:
    """The control: the same split, but attention over the gathered row as one causal sequence (the bounds
    of the documents not carried across the split). Mean loss over all ranks."""
    flat = sequence_parallel.shard_flat(flatten_batch(batch), sp.size, sp.rank)
    whole = int(flat["cu_seqlens"][-1])
    flat = {**flat, "cu_seqlens": torch.tensor([0, whole], dtype=torch.int32), "max_seqlen": whole,
            "sequence_parallel": sp}
    with torch.no_grad():
        logits = packed_forward(model, flat).logits[0]
        totals = torch.stack([cross_entropy_sum(logits, flat["targets"]),
                              (flat["targets"] != -100).sum().float()])
    dist.all_reduce(totals)
    return float(totals[0] / totals[1])


def _run(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=SP)
    sp = sequence_parallel.setup(SP)
    model = _model()
    results = {}
    cases = {"packed": _batch(ROWS), "skewed": _batch([[40, 18]], supervised_from=29, seed=1)}
    for name, batch in cases.items():
        ref_loss, ref_grads = _reference(model, batch)
        for chunk in (0, 16):
            loss, grads, naive = _split(model, batch, sp, chunk)
            results[f"{name}/chunk{chunk}"] = {"reference_loss": ref_loss, "loss": loss, "naive_loss": naive,
                                               "grad_max_diff": _max_diff(grads, ref_grads),
                                               "grad_max": max(float(g.abs().max()) for g in ref_grads.values())}
    counts = [sequence_parallel.local_supervised_tokens(cases["skewed"], SP, r) for r in range(SP)]
    results["skewed_counts"] = counts
    results["control"] = {"reference_loss": results["packed/chunk0"]["reference_loss"],
                          "loss": _without_document_bounds(model, cases["packed"], sp)}
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=2), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run, args=(os.path.join(tmp, "store"), sys.argv[1]), nprocs=SP, join=True)
