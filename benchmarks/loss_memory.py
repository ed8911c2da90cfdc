"""Peak memory of one training step with a 128k vocabulary: the plain loss against the chunked one.

    python benchmarks/loss_memory.py [--tokens 4096 8192] [--chunk 1024] [--dtype fp32]

Each (tokens, loss) case runs in a fresh process (peak resident memory only grows within a process): a
random-init Llama of hidden 512, 2 layers and a 128,256-token vocabulary (Llama 3's), one micro-batch of
``tokens`` tokens packed from 512-token documents, forward + backward + AdamW step through
``training.model.packed_loss``. It prints, per case, the process's peak RSS, its RSS before the step, and
the step's own memory (the difference), and the chunked/plain ratios. Machine memory is checked before each
case so a plain 8k step that would not fit next to other work is reported as skipped, not run into the
out-of-memory killer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VOCAB, HIDDEN, LAYERS, DOC_TOKENS = 128_256, 512, 2, 512


def child(tokens: int, chunk: int, dtype_name: str) -> dict:
    """One step in this process; returns its memory figures in MiB."""
    import numpy as np
    import psutil
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from training.data import Collator
    from training.model import PRECISION_DTYPES, packed_loss

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=PRECISION_DTYPES[dtype_name], attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, tokens)
    pos = np.arange(tokens) % DOC_TOKENS
    batch = Collator(0)([{"input_ids": ids, "labels": np.where(pos == 0, -100, ids), "position_ids": pos}])
    # Warm up the optimizer state on a short batch, so the step measured adds only what the loss needs.
    short = Collator(0)([{"input_ids": ids[:16], "labels": ids[:16], "position_ids": np.arange(16)}])
    packed_loss(model, short, chunk)[0].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = psutil.Process().memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss, _ = packed_loss(model, batch, chunk)
    loss.backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mib = 2**20
    return {"tokens": tokens, "chunk": chunk, "dtype": dtype_name, "loss": float(loss),
            "rss_before_mib": before / mib, "peak_before_mib": peak_before / mib, "peak_mib": peak / mib,
            "step_mib": (peak - before) / mib}


def _available_mib() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**20


def run_case(tokens: int, chunk: int, dtype_name: str, need_mib: float) -> dict | None:
    if _available_mib() < need_mib:
        print(f"skipped tokens {tokens} chunk {chunk}: {_available_mib():,.0f} MiB available < {need_mib:,.0f}")
        return None
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run([sys.executable, __file__, "--child", str(tokens), str(chunk), "--dtype", dtype_name],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_tokens of the chunked side")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.dtype)))
        return
    rows = []
    for tokens in args.tokens:
        # The plain step holds ~4 fp32 copies of [tokens, vocab]; leave 2 GiB to everything else.
        plain_need = 4 * tokens * VOCAB * 4 / 2**20 + 3000
        chunked = run_case(tokens, args.chunk, args.dtype, 3000)
        plain = run_case(tokens, 0, args.dtype, plain_need)
        for case in (plain, chunked):
            if case:
                print(json.dumps(case))
        if plain and chunked:
            rows.append((tokens, chunked["peak_mib"] / plain["peak_mib"], chunked["step_mib"] / plain["step_mib"]))
    for tokens, peak_ratio, step_ratio in rows:
        print(f"tokens {tokens}: chunked/plain peak RSS {peak_ratio:.3f}, step's own memory {step_ratio:.3f}")


if __name__ == "__main__":
    main()
