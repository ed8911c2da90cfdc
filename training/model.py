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
- Restarting ``position_ids`` does not stop packed documents attending to each other, and transformers
  treats only a batch of one row as packed. So every micro-batch runs as one padding-free row with its
  document bounds from the collator (training.attention), and the loss never holds the full fp32 logits
  (training.loss).
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


class ModelError(ValueError):
    """A model the user asked for cannot be built as configured (names the model.* key to fix)."""

    user_error = True


def load_model(model_cfg, precision: str, ds_config: dict) -> nn.Module:
    """Load the causal LM named by ``model_cfg.name_or_path`` ready for training.

    Weights load in the training precision (``bf16``/``fp16``; ``fp32`` stays fp32), with the attention
    ``model_cfg.attn_implementation`` resolves to here (training.attention.choose_attention), the KV cache
    off, and gradient checkpointing as configured.
    With ZeRO stage 3 in ``ds_config`` the model is built partitioned across ranks (needs the
    process group initialised, as ``deepspeed.init_distributed`` does).
    """
    from transformers import AutoModelForCausalLM

    from training.attention import choose_attention

    if precision not in PRECISION_DTYPES:
        raise ModelError(f"train.precision: {precision!r} is not one of {', '.join(PRECISION_DTYPES)}")
    attention = choose_attention(model_cfg.attn_implementation)
    hf_ds_config = _zero3_hf_config(ds_config)
    try:
        model = _load_zero3_streaming(model_cfg, precision, ds_config, attention.hf_name) \
            if hf_ds_config is not None else None
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                model_cfg.name_or_path, revision=model_cfg.revision, dtype=PRECISION_DTYPES[precision],
                attn_implementation=attention.hf_name,
                trust_remote_code=model_cfg.trust_remote_code)
    except (ImportError, ValueError) as exc:
        if "attn_implementation" in str(exc) or "Attention" in str(exc):
            raise ModelError(
                f"model.attn_implementation: {model_cfg.attn_implementation!r} cannot be used with this model "
                f"({str(exc).splitlines()[0][:200]}); use auto, sdpa or eager") from None
        raise
    model._zerotune_attention_kernel = attention.kernel
    if hf_ds_config is not None:
        # transformers keeps only a weak reference; generate() under ZeRO-3 needs it alive to sync ranks.
        model._zerotune_hf_ds_config = hf_ds_config
        mark_moe_leaf_modules(model)
    model.config.use_cache = False
    apply_gradient_checkpointing(model, model_cfg.gradient_checkpointing, model_cfg.checkpoint_every_k_layers)
    return model


def _load_zero3_streaming(model_cfg, precision: str, ds_config: dict, attn_implementation: str) -> nn.Module | None:
    from training.zero3_load import load_streaming

    return load_streaming(model_cfg, PRECISION_DTYPES[precision], ds_config, attn_implementation)


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


def cu_seqlens_from_position_ids(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [D + 1], longest document) of a batch's real tokens laid end to end.

    A document starts where ``position_ids == 0`` and at the start of every row. For hand-built batches
    only: the collator computes the same on the host from the shards (reading device tensors would sync).
    """
    lengths = []
    for pos, real in zip(position_ids.cpu(), attention_mask.cpu().bool()):
        pos = pos[real]
        starts = [0] + [i for i in torch.nonzero(pos == 0).flatten().tolist() if i > 0]
        lengths += [b - a for a, b in zip(starts, starts[1:] + [len(pos)]) if b > a]
    cu = torch.tensor([0] + lengths, dtype=torch.long).cumsum(0).to(torch.int32)
    return cu, max(lengths, default=0)


def document_bounds(batch: dict) -> tuple[torch.Tensor, int]:
    """The collator's (cu_seqlens, max_seqlen), or the same derived from position ids when a loop's
    prepare_batch built a batch without them."""
    if "cu_seqlens" in batch:
        return batch["cu_seqlens"], int(batch["max_seqlen"])
    return cu_seqlens_from_position_ids(batch["position_ids"], batch["attention_mask"])


def flatten_batch(batch: dict) -> dict:
    """The micro-batch as one padding-free row (host work on the collator's CPU tensors).

    ``input_ids``/``position_ids`` become [1, N] (N real tokens, rows concatenated); ``targets`` [N] holds
    for each token the label of the next token of its own row (-100 at a row's end), so the scored tokens
    are exactly ``labels[:, 1:] != -100``; ``index`` [N] is each token's place in the flattened [B * T].
    """
    real = batch["attention_mask"].bool()
    cu, longest = document_bounds(batch)
    labels = batch["labels"]
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return {"input_ids": batch["input_ids"][real][None], "position_ids": batch["position_ids"][real][None],
            "targets": targets[real], "cu_seqlens": cu, "max_seqlen": int(longest),
            "index": real.flatten().nonzero().flatten(), "shape": tuple(real.shape)}


def compute_device(model: nn.Module) -> torch.device:
    """The engine's compute device (parameters may live elsewhere under ZeRO-3 CPU offload)."""
    return getattr(model, "device", None) or next(model.parameters()).device


def packed_forward(model: nn.Module, flat: dict):
    """Run a flattened micro-batch (see flatten_batch) with document-causal attention; the model's output.

    A slice of a row split across a sequence-parallel group carries its ``sequence_parallel`` (see
    training.sequence_parallel.shard_flat); its attention then runs on the whole row.

    ``model`` may be the bare Hugging Face model or the DeepSpeed engine wrapping it.
    """
    from training.attention import attention_inputs, kernel_for

    hf_model = getattr(model, "module", model)
    kernel = getattr(hf_model, "_zerotune_attention_kernel", None) or kernel_for(hf_model.config._attn_implementation)
    device = compute_device(model)
    inputs = attention_inputs(kernel, flat["cu_seqlens"], flat["max_seqlen"], device, hf_model.dtype,
                              flat.get("sequence_parallel"))
    return model(input_ids=flat["input_ids"].to(device), position_ids=flat["position_ids"].to(device),
                 use_cache=False, **inputs)


def forward_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Run a (packed, padded) batch and return logits [B, T, V] (zero at padding).

    ``batch`` holds ``input_ids``, ``position_ids`` and ``attention_mask`` (1 real, 0 pad), all [B, T], and
    the collator's ``cu_seqlens``/``max_seqlen``. This materialises every logit: the training loops use
    packed_loss instead.
    """
    flat = flatten_batch({**batch, "labels": batch.get("labels", batch["input_ids"])})
    logits = packed_forward(model, flat).logits[0]
    rows, length = flat["shape"]
    full = logits.new_zeros((rows * length, logits.shape[-1]))
    full = full.index_copy(0, flat["index"].to(logits.device), logits)
    return full.view(rows, length, -1)


def packed_loss(model: nn.Module, batch: dict, loss_chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of a (packed, padded) batch as (fp32 sum, number of scored tokens).

    With ``loss_chunk_tokens`` > 0 the LM head and the loss run that many tokens at a time and are
    recomputed in backward (training.loss), so the full [N, V] logits never exist; 0 is the plain loss.
    On a model split across a sequence-parallel group, this rank's slice of the row only: its loss sum
    and its count (training.sequence_parallel).
    """
    from training.loss import cross_entropy_sum, lm_head_computes_loss
    from training.sequence_parallel import of_model, shard_flat

    flat = flatten_batch(batch)
    sp = of_model(model)
    if sp is not None:
        flat = {**shard_flat(flat, sp.size, sp.rank), "sequence_parallel": sp}
    targets = flat["targets"]
    count = (targets != IGNORE_INDEX).sum()
    targets = targets.to(compute_device(model))
    if loss_chunk_tokens > 0:
        with lm_head_computes_loss(getattr(model, "module", model), targets, loss_chunk_tokens):
            return packed_forward(model, flat).logits, count
    return cross_entropy_sum(packed_forward(model, flat).logits[0], targets), count


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
