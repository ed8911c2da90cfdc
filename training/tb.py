"""Metrics out of a run: TensorBoard scalars and text, a JSONL copy for scripts, a compact stdout line.

Only rank 0 writes. The step axis is the optimizer step. Scalar tags (exact): train/loss, train/lr,
train/grad_norm, train/tokens_per_sec, train/supervised_tokens_per_sec, train/step_time_sec,
train/data_wait_sec, train/mfu (GPU only), train/memory_gb, train/skipped_steps, eval/loss,
eval/perplexity, test/loss, test/perplexity.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

# Dense peak FLOP/s per device for MFU, by a substring of torch.cuda.get_device_name() and precision.
# Vendor datasheet numbers without sparsity. An unknown device logs no MFU rather than a wrong one.
PEAK_FLOPS = {
    ("H200", "bf16"): 989e12, ("H100", "bf16"): 989e12, ("A100", "bf16"): 312e12,
    ("H200", "fp16"): 989e12, ("H100", "fp16"): 989e12, ("A100", "fp16"): 312e12,
    ("H200", "fp32"): 67e12, ("H100", "fp32"): 67e12, ("A100", "fp32"): 19.5e12,
}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def training_flops(num_params: int, num_layers: int, hidden_size: int, tokens: int,
                   squared_document_tokens_sum: int) -> float:
    """Useful training FLOPs of ``tokens`` tokens: 6N each for the matmuls (forward + backward; Kaplan et
    al.) plus the attention term 12·layers·hidden per (query, key) pair of a document (PaLM appendix B),
    i.e. ``12·layers·hidden·sum(L_i^2)`` over the documents, not the padded row length squared.

    The one formula behind MFU and `zerotune plan`'s time. Recomputation (gradient checkpointing, the
    chunked loss's second LM-head pass) is not useful work and is not counted.
    """
    return 6.0 * num_params * tokens + 12.0 * num_layers * hidden_size * squared_document_tokens_sum


def squared_document_tokens(cu_seqlens) -> int:
    """sum(L_i^2) over the documents of a batch, from the collator's host-side ``cu_seqlens``."""
    bounds = [int(x) for x in cu_seqlens]
    return sum((b - a) ** 2 for a, b in zip(bounds[:-1], bounds[1:]))


def peak_flops_per_device(precision: str) -> float | None:
    """The datasheet peak for the current GPU, or None on CPU / an unknown device."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for (key, prec), flops in PEAK_FLOPS.items():
        if key in name and prec == precision:
            return flops
    return None


def memory_gb() -> float:
    """Peak accelerator memory on GPU (max_memory_allocated), else this process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # ru_maxrss is KiB on Linux


class MetricsLogger:
    """Writes scalars to TensorBoard and ``metrics.jsonl`` and a line to stdout; a no-op off rank 0."""

    def __init__(self, tensorboard_dir: str, jsonl_path: Path, enabled: bool):
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=tensorboard_dir)
            self._jsonl = open(jsonl_path, "a", encoding="utf-8")

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        """Log ``{tag: value}`` at ``step``; ``kind`` labels the JSONL record."""
        if not self.enabled:
            return
        for tag, value in values.items():
            if value is not None:
                self._writer.add_scalar(tag, value, step)
        record = {"kind": kind, "step": step, **{k: v for k, v in values.items() if v is not None}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self._writer.add_text(tag, text, step)

    def line(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._writer.flush()
            self._writer.close()
            self._jsonl.close()
