"""The model side of training: load the causal LM, checkpoint activations, run packed batches, score tokens.

Three facts shape this module:
- Under ZeRO-3 the model must be built already partitioned, or a model larger than one device
  materialises whole on every rank first. transformers does this itself when a live
  ``HfDeepSpeedConfig`` says stage 3: ``from_pretrained`` then builds the model inside
  ``deepspeed.zero.Init(config_dict_or_path=<that config>)`` and loads the weights one gathered module
  at a time. Wrapping ``from_pretrained`` in our own ``zero.Init`` instead would load weights into
  empty partitions, so we hand the config to transformers. Its loader maps the whole checkpoint on
  global rank 0, though, so a local safetensors checkpoint is streamed instead, each rank reading only
  its partition's slices (training/zero3_load.py).
- Restarting ``position_ids`` does not stop packed documents attending to each other with sdpa, eager or
  flex attention; only an explicit block-diagonal causal mask does (flash-attention's variable-length
  kernels read the boundaries from ``position_ids``). A 4D mask given to transformers is used as given.
  With sdpa the dense mask still costs the full T x T per row, so packed rows also carry their document
  bounds and sdpa runs once per document with its causal kernel (the mask stays as the exact fallback).
- Losses are a token sum and a token count, so the driver can normalise over accumulation and ranks.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Implementations that read document boundaries from position_ids and must not get a dense mask.
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


class ModelError(ValueError):
    """A model the user asked for cannot be built as configured (names the model.* key to fix)."""

    user_error = True


def load_model(model_cfg, precision: str, ds_config: dict) -> nn.Module:
    """Load the causal LM named by ``model_cfg.name_or_path`` ready for training.

    Weights load in the training precision (``bf16``/``fp16``; ``fp32`` stays fp32), with
    ``model_cfg.attn_implementation``, the KV cache off, and gradient checkpointing as configured.
    With ZeRO stage 3 in ``ds_config`` the model is built partitioned across ranks (needs the
    process group initialised, as ``deepspeed.init_distributed`` does).
    """
    from transformers import AutoModelForCausalLM

    if precision not in PRECISION_DTYPES:
        raise ModelError(f"train.precision: {precision!r} is not one of {', '.join(PRECISION_DTYPES)}")
    hf_ds_config = _zero3_hf_config(ds_config)
    try:
        model = _load_zero3_streaming(model_cfg, precision, ds_config) if hf_ds_config is not None else None
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                model_cfg.name_or_path, revision=model_cfg.revision, dtype=PRECISION_DTYPES[precision],
                attn_implementation=model_cfg.attn_implementation,
                trust_remote_code=model_cfg.trust_remote_code)
    except (ImportError, ValueError) as exc:
        if "attn_implementation" in str(exc) or "Attention" in str(exc):
            raise ModelError(
                f"model.attn_implementation: {model_cfg.attn_implementation!r} cannot be used here "
                f"({str(exc).splitlines()[0][:200]}); use sdpa or eager, or install its package") from None
        raise
    if hf_ds_config is not None:
        # transformers keeps only a weak reference; generate() under ZeRO-3 needs it alive to sync ranks.
        model._zerotune_hf_ds_config = hf_ds_config
        mark_moe_leaf_modules(model)
    model.config.use_cache = False
    apply_gradient_checkpointing(model, model_cfg.gradient_checkpointing, model_cfg.checkpoint_every_k_layers)
    return model


def _load_zero3_streaming(model_cfg, precision: str, ds_config: dict) -> nn.Module | None:
    from training.zero3_load import load_streaming

    return load_streaming(model_cfg, PRECISION_DTYPES[precision], ds_config)


def _zero3_hf_config(ds_config: dict):
    """Register ``ds_config`` with transformers when it asks for ZeRO-3; returns the object to keep alive."""
    stage = (ds_config or {}).get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(_init_only_config(ds_config))


def _init_only_config(ds_config: dict) -> dict:
    """A copy of ``ds_config`` that ``zero.Init`` can parse even before every value is resolved.

    ``zero.Init`` reads only the ZeRO and precision sections, but DeepSpeed's parser also checks the
    batch arithmetic and value types, which an unresolved ``"auto"`` fails.
    """
    cfg = {k: v for k, v in ds_config.items() if v != "auto"}
    batch_keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    if not all(isinstance(cfg.get(k), int) for k in batch_keys):
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=world)
    return cfg


# --------------------------------------------------------------------------- mixture of experts


def moe_block_classes(model: nn.Module) -> list[type]:
    """Classes of the model's mixture-of-experts blocks: modules with a child named ``experts``
    (Mixtral's and Qwen-MoE's SparseMoeBlock, DeepSeek's MoE), in the order first met."""
    found: list[type] = []
    for module in model.modules():
        if "experts" in dict(module.named_children()) and type(module) not in found:
            found.append(type(module))
    return found


def mark_moe_leaf_modules(model: nn.Module) -> list[type]:
    """Make every MoE block a ZeRO-3 leaf: its parameters (router and all experts) are gathered once when
    the block starts, instead of by per-module hooks inside it. Routing sends tokens to different experts
    on different ranks, so per-expert hooks would fire a different number of times per rank (a hang), and
    gather each expert separately. Costs one MoE layer's experts gathered at a time (at Mixtral 8x7B
    scale: ~1.4B parameters, 2.8 GB in bf16). Returns the classes marked (none for a dense model)."""
    classes = moe_block_classes(model)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
    return classes


# --------------------------------------------------------------------------- gradient checkpointing


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (Llama/Qwen/Mistral: ``model.model.layers``)."""
    model = getattr(model, "module", model)
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        node: Any = model
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList):
            return node
    raise ModelError(f"model.gradient_checkpointing: cannot find the decoder layer list of "
                     f"{type(model).__name__} (looked for model.layers, transformer.h, gpt_neox.layers); "
                     f"use gradient_checkpointing: none")


def apply_gradient_checkpointing(model: nn.Module, mode: str, every_k_layers: int = 2) -> list[int]:
    """Checkpoint activations of the selected decoder layers (non-reentrant); returns their indices.

    ``none`` checkpoints nothing, ``full`` every layer, ``every_k`` layers 0, k, 2k, ... Only the layer's
    ``forward`` is wrapped (not ``__call__``), so module hooks such as ZeRO-3's parameter fetch stay outside
    the checkpoint and run again, as they must, when the backward pass recomputes the layer.
    """
    if mode == "none":
        return []
    if mode not in ("full", "every_k"):
        raise ModelError(f"model.gradient_checkpointing: {mode!r} is not one of none, full, every_k")
    if mode == "every_k" and every_k_layers < 1:
        raise ModelError(f"model.checkpoint_every_k_layers: must be >= 1, got {every_k_layers}")
    step = 1 if mode == "full" else every_k_layers
    layers = decoder_layers(model)
    chosen = list(range(0, len(layers), step))
    for index in chosen:
        _checkpoint_forward(layers[index])
    return chosen


def _checkpoint_forward(layer: nn.Module) -> None:
    if getattr(layer, "_zerotune_checkpointed", False):
        return
    inner = layer.forward

    @functools.wraps(inner)
    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    layer.forward = types.MethodType(forward, layer)
    layer._zerotune_checkpointed = True


# --------------------------------------------------------------------------- packed forward and loss


def document_attention_mask(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, T, T], True where a query may attend to a key.

    A document starts where ``position_ids == 0``. A real token sees earlier real tokens of its own
    document only; a padding token sees only itself, so no softmax row is empty (no NaN) and no real
    token ever sees padding.
    """
    real = attention_mask.bool()
    doc_ids = torch.cumsum((position_ids == 0).long(), dim=1)
    same_doc = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = same_doc & causal & real.unsqueeze(2) & real.unsqueeze(1)
    allowed |= torch.eye(length, dtype=torch.bool, device=position_ids.device)
    return allowed.unsqueeze(1)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill(~mask, torch.finfo(dtype).min)


def _one_document_per_row(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """True when no row is packed or padded, so plain causal attention is already exact."""
    return bool(attention_mask.bool().all()) and bool(((position_ids == 0).sum(dim=1) == 1).all()) \
        and bool((position_ids[:, 0] == 0).all())


def forward_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Run a (packed, padded) batch and return logits [B, T, V].

    ``batch`` holds ``input_ids``, ``position_ids`` and ``attention_mask`` (1 real, 0 pad), all [B, T].
    ``model`` may be the bare Hugging Face model or the DeepSpeed engine wrapping it.
    """
    hf_model = getattr(model, "module", model)
    impl = hf_model.config._attn_implementation
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if impl in VARLEN_IMPLEMENTATIONS or _one_document_per_row(position_ids, attention_mask):
        # No dense mask: the kernel's own causal path (and sdpa's flash kernel) applies.
        mask = None
    else:
        mask = document_attention_mask(position_ids, attention_mask)
        if impl != "sdpa":  # eager and flex add the mask to the scores: a boolean one would add 0/1
            mask = _additive(mask, hf_model.dtype)
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False,
                **_bounds_kwargs(impl, mask, position_ids, attention_mask))
    return out.logits


def _bounds_kwargs(impl: str, mask, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """Document bounds for packed rows under sdpa (see _install_packed_sdpa); empty otherwise."""
    if impl != "sdpa" or mask is None:
        return {}
    bounds = document_bounds(position_ids, attention_mask)
    if bounds is None:
        return {}
    _install_packed_sdpa()
    return {DOC_BOUNDS_KWARG: bounds}


# --------------------------------------------------------------------------- packed sdpa, one document at a time

# Keyword the sdpa wrapper below reads: per row, the [start, end) token ranges to attend within.
DOC_BOUNDS_KWARG = "zerotune_doc_bounds"


def document_bounds(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the [start, end) range of each document, then one range for the trailing padding if any.

    None when some row's padding is not all at the end (the collator pads on the right; anything else
    keeps the dense mask).
    """
    pos, real = position_ids.detach().cpu(), attention_mask.detach().cpu().bool()
    total = pos.shape[1]
    lengths = real.sum(dim=1).tolist()
    bounds = []
    for row, n in enumerate(lengths):
        if not bool(real[row, :n].all()):
            return None
        starts = [0] + [i for i in torch.nonzero(pos[row, :n] == 0).flatten().tolist() if i > 0]
        ranges = list(zip(starts, starts[1:] + [n]))
        if n < total:
            ranges.append((n, total))  # padding attends to padding only; never scored, never attended to
        bounds.append(ranges)
    return bounds


def _packed_sdpa(original):
    def packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
        """transformers' sdpa, run once per document with the causal kernel when document bounds are given:
        attention costs the sum of squared document lengths instead of the square of the row length."""
        bounds = kwargs.pop(DOC_BOUNDS_KWARG, None)
        if bounds is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        rows = []
        for b, ranges in enumerate(bounds):
            parts = [original(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], None,
                              **kwargs)[0] for s, e in ranges]
            rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        return (torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]), None

    packed_sdpa_attention._zerotune_original = original
    return packed_sdpa_attention


def _install_packed_sdpa() -> None:
    """Wrap transformers' "sdpa" attention (once per process) so it honours DOC_BOUNDS_KWARG.

    Without the keyword the wrapper calls the original unchanged, so generation, export and other callers see
    plain sdpa. The dense block-diagonal mask is still passed alongside the bounds: a model whose layers do not
    forward extra keywords to their attention function stays exact, only slower.
    """
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not hasattr(current, "_zerotune_original"):
        AttentionInterface.register("sdpa", _packed_sdpa(current))


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy as (sum over scored tokens in fp32, number of scored tokens).

    The logit at position t predicts ``labels[t + 1]``; labels of -100 are not scored.
    """
    shifted_logits = logits[:, :-1, :].float()
    targets = labels[:, 1:].to(shifted_logits.device)
    loss_sum = nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")
    token_count = (targets != IGNORE_INDEX).sum()
    return loss_sum, token_count
