"""A few greedy generations from validation prompts, logged to TensorBoard as text.

Under ZeRO-3 every forward gathers parameters from all ranks, so every rank calls ``generate`` with the
same prompts (read from the start of the validation split) and ``synced_gpus=True``, which keeps a rank
that finished early stepping until all have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.data import first_sequences

PROMPT_FALLBACK_TOKENS = 16


def prompt_ids(sequence: dict[str, np.ndarray]) -> np.ndarray:
    """The prompt of the first document: its tokens before the first supervised label.

    A document without supervised tokens (plain text) gives its first few tokens.
    """
    positions = np.asarray(sequence["position_ids"])
    starts = np.flatnonzero(positions == 0)
    end = int(starts[1]) if len(starts) > 1 else len(positions)
    labels = np.asarray(sequence["labels"][:end])
    supervised = np.flatnonzero(labels != -100)
    cut = int(supervised[0]) if len(supervised) and supervised[0] > 0 else min(PROMPT_FALLBACK_TOKENS, end)
    return np.asarray(sequence["input_ids"][:cut], dtype=np.int64)


def generate_samples(model, tokenizer, data_dir: str | Path, manifest: dict, count: int,
                     max_new_tokens: int, synced: bool, device: torch.device) -> str:
    """Markdown text with ``count`` prompts and their greedy continuations (call on every rank)."""
    seqs = first_sequences(data_dir, manifest, "validation", count)
    was_training = model.training
    model.eval()
    parts = []
    try:
        for i, seq in enumerate(seqs):
            ids = torch.from_numpy(prompt_ids(seq)).unsqueeze(0).to(device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, synced_gpus=synced, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            prompt = tokenizer.decode(ids[0], skip_special_tokens=False)
            answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            parts.append(f"**prompt {i}**\n\n```\n{prompt}\n```\n\n**generated**\n\n```\n{answer}\n```")
    finally:
        model.train(was_training)
    return "\n\n".join(parts)
