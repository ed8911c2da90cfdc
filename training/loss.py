"""The next-token loss without the full fp32 logits: LM head and cross-entropy one chunk of tokens at a time.

The plain loss materialises ``[N, V]`` logits in the model dtype, an fp32 copy, the saved log-softmax and
its gradient: at 8k tokens and a 128k vocabulary about 4 GB per fp32 copy, the largest single allocation
of a 7B step. The chunked loss keeps only the hidden states ``[N, H]`` (already alive for the backward of
the final norm) and, per chunk of C tokens, a ``[C, V]`` block that is freed before the next chunk;
backward recomputes each chunk's logits (2·C·H·V FLOPs per chunk, not useful work: MFU ignores it).

It runs inside the LM head's own forward (for the duration of one training forward), so under ZeRO-3 the
head's weight is gathered by DeepSpeed's module hooks once in forward and once in backward, like any layer,
not once per chunk, and its gradient reaches DeepSpeed's reduce-scatter hooks as usual.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

IGNORE_INDEX = -100
# Config attributes of models that transform logits after the LM head (the chunked loss would skip it).
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class LossChunkError(ValueError):
    """``train.loss_chunk_tokens`` asks for the chunked loss on a model it cannot serve exactly."""

    user_error = True


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain loss: fp32 sum of cross-entropy over ``targets != -100`` (logits [N, V], targets [N])."""
    return nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def describe_loss(chunk_tokens: int) -> str:
    """How the run computes its loss, in words (for the first log line and `zerotune plan`)."""
    return f"chunked, {chunk_tokens} tokens per chunk" if chunk_tokens > 0 else "plain (full fp32 logits)"


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(hidden, weight).float()


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension in place (fp32 [C, V]): one chunk-sized buffer instead of two."""
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=-1, keepdim=True))


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum_t CE(hidden[t] @ weight.T, targets[t]) over chunks of ``chunk`` tokens; backward recomputes."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):  # noqa: D401 - autograd signature
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[start:start + chunk], weight)
            total = total + cross_entropy_sum(logits, targets[start:start + chunk])
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[start:start + ctx.chunk], targets[start:start + ctx.chunk]
            grad = _softmax_(_chunk_logits(h, weight))
            # d CE / d logits = softmax - one_hot(target), zero on unscored rows (no boolean indexing: no sync).
            grad.scatter_add_(1, t.clamp_min(0).unsqueeze(1), -torch.ones_like(grad[:, :1]))
            grad = grad.mul_((t != IGNORE_INDEX).unsqueeze(1) * grad_total).to(hidden.dtype)
            grad_hidden[start:start + ctx.chunk] = grad @ weight
            grad_weight += (grad.t() @ h).float()
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def check_chunkable(hf_model: nn.Module) -> nn.Linear:
    """The model's LM head, when the chunked loss reproduces the model's logits exactly; else one clear error."""
    head = hf_model.get_output_embeddings()
    text = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
    post = [name for name in LOGIT_POSTPROCESSING if getattr(text, name, None) not in (None, 1, 1.0)]
    if not isinstance(head, nn.Linear) or head.bias is not None or post:
        why = f"it transforms its logits after the LM head ({', '.join(post)})" if post else \
            "its LM head is not a bias-free nn.Linear"
        raise LossChunkError(f"train.loss_chunk_tokens: the chunked loss cannot serve {type(hf_model).__name__}: "
                             f"{why}; set train.loss_chunk_tokens: 0 (the plain loss)")
    return head


def _install(head: nn.Linear) -> None:
    if getattr(head, "_zerotune_loss_head", False):
        return
    plain = head.forward

    def forward(self, hidden):
        pending = self.__dict__.get("_zerotune_loss_targets")
        if pending is None:
            return plain(hidden)
        targets, chunk = pending
        return ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), self.weight, targets, chunk)

    head.forward = types.MethodType(forward, head)
    head._zerotune_loss_head = True


@contextlib.contextmanager
def lm_head_computes_loss(hf_model: nn.Module, targets: torch.Tensor, chunk_tokens: int):
    """Within this block the model's LM head returns the chunked loss sum of ``targets`` [N] instead of
    logits (so ``output.logits`` is that fp32 scalar); outside it the head is the plain linear layer."""
    head = check_chunkable(hf_model)
    _install(head)
    head._zerotune_loss_targets = (targets, int(chunk_tokens))
    try:
        yield
    finally:
        head._zerotune_loss_targets = None
