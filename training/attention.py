"""Packed-document attention: one padding-free row per micro-batch, document bounds known on the host.

A micro-batch of B packed rows is flattened into one row of its real tokens, ``[1, sum(L)]`` (padding
removed), and every attention implementation is told where each document starts, from the collator's
``cu_seqlens`` (cumulative document lengths, computed on the host from the shards):

- ``varlen`` (torch's ``varlen_attn``, CUDA) and ``flash_attention_2/3``: one variable-length kernel call
  per layer, fed ``cu_seq_lens_q/k`` and ``max_length_q/k``;
- ``flex_attention``: a document-causal ``BlockMask`` built once per micro-batch;
- ``sdpa``: the causal kernel once per document (the CPU choice);
- ``eager``: a dense additive [1, 1, N, N] mask: the slow reference the others are tested against.

So micro_batch_size > 1 never mixes documents, no step reads position ids back from the device, and only
``eager`` builds an N x N mask. At 70B on 64 GPUs nothing here is per-rank memory beyond one int32 per
document; the varlen kernels cost the sum of squared document lengths, not the squared row length.

transformers builds no mask of its own when given a 4D one, so the non-mask kernels get a zero-size 4D
placeholder and the wrapped attention function (installed once per process, only acting when the
documents keyword is present) ignores it. Generation and export call the plain functions.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from training.model import ModelError

# The names `model.attn_implementation` accepts, besides "auto".
IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "varlen", "flash_attention_2", "flash_attention_3")
# Keyword the wrapped attention functions read (see _packed_attention).
DOCUMENTS_KWARG = "zerotune_documents"
_FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


class AttentionUnavailable(ModelError):
    """``model.attn_implementation`` names a kernel that is not installed or not usable on this device."""


@dataclass(frozen=True)
class AttentionChoice:
    """What the run uses: the name transformers loads the model with, and the packed-batch kernel."""

    requested: str
    hf_name: str  # sdpa, eager, flex_attention, flash_attention_2/3 (torch varlen runs inside sdpa's slot)
    kernel: str  # sdpa, eager, flex, varlen, flash

    def describe(self) -> str:
        via = " (torch varlen_attn)" if self.kernel == "varlen" else ""
        return f"attention: {self.requested} -> {self.hf_name if self.kernel != 'varlen' else 'varlen'}{via}"


def _varlen_usable() -> str | None:
    """None when torch's varlen_attn can run here, else why not."""
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU"
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return "this torch has no torch.nn.attention.varlen"
    if torch.cuda.get_device_capability()[0] < 8:
        return "it needs an Ampere or newer GPU (compute capability >= 8.0)"
    return None


def _flash_usable(name: str) -> str | None:
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU"
    if importlib.util.find_spec(_FLASH_PACKAGES[name]) is None:
        return f"the {_FLASH_PACKAGES[name]} package is not installed"
    return None


def _flex_usable() -> str | None:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return "this torch has no flex_attention"
    if not torch.cuda.is_available():
        return "torch runs its backward on CUDA only (FlexAttention does not support backward on CPU)"
    return None


def _why_unusable(name: str) -> str | None:
    if name in _FLASH_PACKAGES:
        return _flash_usable(name)
    return {"varlen": _varlen_usable, "flex_attention": _flex_usable}.get(name, lambda: None)()


def choose_attention(requested: str) -> AttentionChoice:
    """Resolve ``model.attn_implementation`` for this machine, or raise one error naming the key.

    ``auto`` takes the fastest exact kernel available: a varlen kernel on CUDA (flash_attention_2 when
    installed, else torch's varlen_attn), else flex_attention on CUDA, else sdpa (the CPU choice).
    """
    if requested == "auto":
        for name in ("flash_attention_2", "varlen", "flex_attention"):
            if _why_unusable(name) is None:
                return _choice("auto", name)
        return _choice("auto", "sdpa")
    if requested not in IMPLEMENTATIONS:
        raise AttentionUnavailable(f"model.attn_implementation: {requested!r} is not one of auto, "
                                   f"{', '.join(IMPLEMENTATIONS)}")
    why = _why_unusable(requested)
    if why is not None:
        usable = [n for n in IMPLEMENTATIONS if _why_unusable(n) is None]
        raise AttentionUnavailable(f"model.attn_implementation: {requested!r} cannot be used here: {why}; use "
                                   f"auto or one of {', '.join(usable)}")
    return _choice(requested, requested)


def _choice(requested: str, name: str) -> AttentionChoice:
    if name == "varlen":
        return AttentionChoice(requested, "sdpa", "varlen")
    kernel = {"flex_attention": "flex", "flash_attention_2": "flash", "flash_attention_3": "flash"}.get(name, name)
    return AttentionChoice(requested, name, kernel)


def kernel_for(hf_name: str) -> str:
    """The packed kernel for a model loaded with transformers' ``hf_name`` (when no choice was recorded)."""
    return _choice(hf_name, hf_name).kernel if hf_name in IMPLEMENTATIONS else "eager"


# --------------------------------------------------------------------------- the documents of one micro-batch


@dataclass
class Documents:
    """The documents of one flattened micro-batch: ``cu_seqlens`` on the host, and on the device."""

    bounds: list[tuple[int, int]]  # [start, end) of each document in the flattened row (host)
    max_length: int
    cu_seqlens: torch.Tensor  # int32 [D + 1] on the compute device
    # Set when the row is split across a sequence-parallel group: the kernel runs on the whole row after
    # an all-to-all (training.sequence_parallel); bounds and cu_seqlens are then the whole row's.
    sequence_parallel: object = None


def attention_inputs(kernel: str, cu_seqlens: torch.Tensor, max_length: int, device, dtype,
                     sequence_parallel=None) -> dict:
    """Model keywords that make attention document-causal on a flattened row (host ints in, no device reads).

    With ``sequence_parallel`` (a training.sequence_parallel.SequenceParallel) the model sees this rank's
    slice of the row while ``cu_seqlens`` describes the whole row; only the wrapped kernels serve that.
    """
    if cu_seqlens.device.type != "cpu":
        raise ValueError("cu_seqlens must be the collator's CPU tensor: reading it from the device would sync")
    host = cu_seqlens.tolist()
    if sequence_parallel is not None and kernel in ("eager", "flex"):
        raise AttentionUnavailable(f"model.attn_implementation: the {kernel} kernel cannot run split across a "
                                   f"sequence-parallel group; use sdpa, varlen or flash_attention_2")
    if kernel == "eager":
        return {"attention_mask": dense_document_mask(host, dtype, device)}
    if kernel == "flex":
        return {"attention_mask": document_block_mask(host, device)}
    _install_packed_attention()
    docs = Documents(list(zip(host[:-1], host[1:])), int(max_length),
                     cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True), sequence_parallel)
    placeholder = torch.zeros((1, 1, 0, 0), dtype=dtype, device=device)  # see module docstring
    return {"attention_mask": placeholder, DOCUMENTS_KWARG: (kernel, docs)}


def document_ids(cu_seqlens: list[int]) -> torch.Tensor:
    """The document index of every token of the flattened row, [N] (host)."""
    lengths = torch.tensor([b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def dense_document_mask(cu_seqlens: list[int], dtype: torch.dtype, device) -> torch.Tensor:
    """Additive block-diagonal causal mask [1, 1, N, N] (0 allowed, dtype minimum not): the eager reference."""
    doc = document_ids(cu_seqlens).to(device)
    total = doc.shape[0]
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    allowed = causal & (doc[:, None] == doc[None, :])
    mask = torch.zeros((total, total), dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def document_block_mask(cu_seqlens: list[int], device):
    """flex_attention's document-causal BlockMask for the flattened row, built once per micro-batch."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(cu_seqlens).to(device)

    def document_causal(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

    total = doc.shape[0]
    return create_block_mask(document_causal, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device)


# --------------------------------------------------------------------------- the kernels


def _per_document_sdpa(original, module, query, key, value, docs: Documents, kwargs):
    # query [1, H, N, D]; transformers' sdpa returns [1, n, H, D] per call.
    parts = [original(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, **kwargs)[0]
             for s, e in docs.bounds]
    return (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]), None


def _torch_varlen(module, query, key, value, docs: Documents, kwargs):
    from torch.nn.attention.varlen import varlen_attn

    if kwargs.get("dropout", 0.0) or kwargs.get("sliding_window"):
        raise AttentionUnavailable("model.attn_implementation: varlen does not apply attention dropout or sliding "
                                   "windows; use flash_attention_2 or sdpa for this model")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [N, H, D]
    out = varlen_attn(q, k, v, docs.cu_seqlens, docs.cu_seqlens, docs.max_length, docs.max_length,
                      scale=kwargs.get("scaling"), window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1])
    return out.unsqueeze(0), None


def _flash(original, module, query, key, value, docs: Documents, kwargs):
    kwargs = {**kwargs, "cu_seq_lens_q": docs.cu_seqlens, "cu_seq_lens_k": docs.cu_seqlens,
              "max_length_q": docs.max_length, "max_length_k": docs.max_length}
    return original(module, query, key, value, None, **kwargs)


def _packed_attention(original):
    def packed_attention(module, query, key, value, attention_mask, **kwargs):
        """transformers' attention function, or with DOCUMENTS_KWARG one document-causal call per layer."""
        packed = kwargs.pop(DOCUMENTS_KWARG, None)
        if packed is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        kernel, docs = packed

        def run(q, k, v):
            if kernel == "varlen":
                return _torch_varlen(module, q, k, v, docs, kwargs)
            if kernel == "flash":
                return _flash(original, module, q, k, v, docs, kwargs)
            return _per_document_sdpa(original, module, q, k, v, docs, kwargs)

        if docs.sequence_parallel is not None:
            from training.sequence_parallel import attention

            return attention(run, query, key, value, docs.sequence_parallel)
        return run(query, key, value)

    packed_attention._zerotune_original = original
    return packed_attention


def _install_packed_attention() -> None:
    """Wrap transformers' sdpa and flash attention functions, once per process (see _packed_attention)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name in ("sdpa", "flash_attention_2", "flash_attention_3"):
        current = ALL_ATTENTION_FUNCTIONS._global_mapping.get(name)
        if current is not None and not hasattr(current, "_zerotune_original"):
            AttentionInterface.register(name, _packed_attention(current))
