"""Ulysses sequence parallelism for packed rows: N ranks share one micro-batch, each holding 1/N of its tokens.

With ``train.sequence_parallel_size`` N, consecutive ranks ``[g * N, (g + 1) * N)`` form sequence-parallel
group g, and the world is W / N data-parallel ranks: every rank of a group reads data-parallel rank g's
micro-batches (training.steps.data_parallel_size, training.data.deal_step). A micro-batch is flattened into
one padding-free row (training.model.flatten_batch), its next-token targets taken *before* the split (so the
last token of one slice predicts the first of the next), padded to a multiple of N with unscored tokens that
form their own document, and cut into N equal contiguous slices (:func:`shard_flat`): rank r of the group
embeds, projects and scores slice r only. In each attention layer an all-to-all trades the sequence split for
a head split (:func:`heads_to_sequence`): each rank then holds H / N heads over the whole row and runs the
document-causal kernel of training.attention with the row's *global* ``cu_seqlens``, so every document sees
exactly itself, wherever the slice boundaries fall; a second all-to-all gives the heads back
(:func:`sequence_to_heads`). Backward runs the same exchanges in reverse.

Why our own wrapper rather than DeepSpeed's ``UlyssesSPAttentionHF``: ours runs inside the packed-attention
function training.attention already registers with transformers, so the document bounds the collator
computed on the host reach the kernel unchanged (DeepSpeed's HF wrapper calls the stock attention with the
local ``position_ids``/mask and has no place for the global ``cu_seqlens`` of a packed row), and the loss
stays our token sum and count (training.loss) instead of its per-rank mean.

Why no DeepSpeed ``mpu``: each rank's gradient is the gradient of its own slice's token-loss sum (the
all-to-all backward carries the attention terms between ranks), so the step's gradient is the plain sum over
all W ranks, which is what DeepSpeed's data-parallel averaging over every rank computes; ZeRO therefore
partitions parameters, gradients and optimizer states over all W ranks as it does without SP (and as ALST
does over its sequence-data-parallel group), checkpoints keep their layout, and the driver's normalisation
(``loss_sum * world_size / supervised tokens of the step over all ranks``) is unchanged: each supervised
token lives on exactly one rank. DeepSpeed is only told ``sequence_parallel_size`` for its batch arithmetic.

Cost at scale (70B, 64 GPUs, N = 8, 128k tokens): per layer, 4 all-to-alls in forward (q, k, v, output)
and 4 in backward inside a node, each moving (N - 1) / N of a [16k, H·D] activation (for Llama-70B's 8 KV
heads, k and v are 8x smaller); per-rank activations are those of T / N tokens, except the attention
kernel's, which sees H / N heads of all T tokens. Parameters, gradients and optimizer states are unchanged
by N (ZeRO shards them over all ranks). N must divide the attention heads and the KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from training.model import IGNORE_INDEX, ModelError

# Attention kernels that take document bounds through the packed-attention wrapper (training.attention).
SP_KERNELS = ("sdpa", "varlen", "flash")


class SequenceParallelError(ModelError):
    """``train.sequence_parallel_size`` cannot split this model or world (names the key and the numbers)."""


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place: its sequence-parallel group (``size`` ranks, ``rank`` within it) and its
    data-parallel coordinates (which micro-batches it reads)."""

    size: int
    rank: int
    group: object  # the torch.distributed group of the SP ranks; None when size is 1
    dp_rank: int
    dp_size: int

    @property
    def active(self) -> bool:
        return self.size > 1


def size_problems(size: int, world_size: Optional[int], heads: Optional[int], kv_heads: Optional[int]) -> list[str]:
    """Why ``size`` cannot split this world or model (empty when it can); each names the key and the numbers."""
    problems = []
    if world_size is not None and world_size % size:
        problems.append(f"train.sequence_parallel_size {size} does not divide the world size {world_size}")
    for what, count in (("attention heads", heads), ("KV heads", kv_heads)):
        if count is not None and count % size:
            problems.append(f"train.sequence_parallel_size {size} does not divide the model's {count} {what} "
                            f"(each rank attends with {what} / {size})")
    return problems


def check_model(size: int, model_config, kernel: str) -> None:
    """Raise one SequenceParallelError when ``size`` > 1 cannot run this model with this attention kernel."""
    if size <= 1:
        return
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = text.num_attention_heads
    problems = size_problems(size, None, heads, getattr(text, "num_key_value_heads", None) or heads)
    if kernel not in SP_KERNELS:
        problems.append(f"model.attn_implementation resolves to {kernel!r}, which sequence parallelism does not "
                        f"wrap; use sdpa, varlen or flash_attention_2")
    if problems:
        raise SequenceParallelError("; ".join(problems) + "; use a divisor of both head counts (or 1)")


def setup(size: int) -> SequenceParallel:
    """Create the sequence-parallel groups of consecutive ranks (a collective: every rank calls it, in the
    same order) and return this rank's place. Size 1 creates nothing."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if size <= 1:
        return SequenceParallel(1, 0, None, rank, world)
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return SequenceParallel(size, rank % size, mine, rank // size, world // size)


def placement(model) -> SequenceParallel:
    """This rank's SequenceParallel from the model (see setup), or size 1 (every rank data-parallel)."""
    sp = getattr(getattr(model, "module", model), "_zerotune_sequence_parallel", None)
    return sp if sp is not None else SequenceParallel(1, 0, None, dist.get_rank(), dist.get_world_size())


def of_model(model) -> Optional[SequenceParallel]:
    """The SequenceParallel attached to a model (bare or wrapped by the DeepSpeed engine), if any."""
    sp = getattr(getattr(model, "module", model), "_zerotune_sequence_parallel", None)
    return sp if sp is not None and sp.active else None


# --------------------------------------------------------------------------- splitting a flattened row


def padded_length(tokens: int, size: int) -> int:
    """The flattened row's length once padded to a multiple of ``size`` (each rank gets length / size)."""
    return -(-tokens // size) * size


def shard_flat(flat: dict, size: int, rank: int) -> dict:
    """Rank ``rank``'s slice of a flattened micro-batch (training.model.flatten_batch), host tensors only.

    The row is padded to a multiple of ``size`` with unscored tokens (target -100, id 0, positions 0, 1, ...)
    that form one extra document, so they attend only to each other. ``input_ids``, ``position_ids`` and
    ``targets`` become this rank's contiguous slice; ``cu_seqlens``/``max_seqlen`` describe the whole padded
    row (attention runs on it after the all-to-all).
    """
    total = flat["input_ids"].shape[1]
    pad = padded_length(total, size) - total
    input_ids, position_ids, targets = flat["input_ids"], flat["position_ids"], flat["targets"]
    cu, longest = flat["cu_seqlens"], flat["max_seqlen"]
    if pad:
        input_ids = torch.cat([input_ids, input_ids.new_zeros((1, pad))], dim=1)
        position_ids = torch.cat([position_ids, torch.arange(pad, dtype=position_ids.dtype)[None]], dim=1)
        targets = torch.cat([targets, targets.new_full((pad,), IGNORE_INDEX)])
        cu = torch.cat([cu, cu.new_tensor([total + pad])])
        longest = max(int(longest), pad)
    per_rank = (total + pad) // size
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    return {**flat, "input_ids": input_ids[:, part], "position_ids": position_ids[:, part],
            "targets": targets[part], "cu_seqlens": cu, "max_seqlen": int(longest)}


def local_supervised_tokens(batch: dict, size: int, rank: int) -> int:
    """Supervised tokens of a (packed, padded) batch that rank ``rank`` of its SP group scores (host)."""
    from training.model import flatten_batch

    return int((shard_flat(flatten_batch(batch), size, rank)["targets"] != IGNORE_INDEX).sum())


# --------------------------------------------------------------------------- the all-to-all attention


class _Exchange(torch.autograd.Function):
    """All-to-all over dim 0 of [N, ...]: block j goes to group rank j, block i of the result came from
    rank i. The exchange is its own adjoint, so backward exchanges the gradient the same way."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: D401 - autograd signature
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group), None


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def heads_to_sequence(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """[1, H, n, D] (all heads, this rank's n tokens) -> [1, H / N, N * n, D] (its heads, the whole row)."""
    _, heads, n, dim = x.shape
    blocks = x[0].reshape(sp.size, heads // sp.size, n, dim)  # block j: the heads group rank j attends with
    got = _Exchange.apply(blocks, sp.group)  # [N (source rank = sequence slice), H / N, n, D]
    return got.permute(1, 0, 2, 3).reshape(heads // sp.size, sp.size * n, dim)[None]


def sequence_to_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """[1, N * n, H / N, D] (attention output: the whole row, this rank's heads) -> [1, n, H, D]."""
    _, total, heads, dim = x.shape
    n = total // sp.size
    blocks = x[0].reshape(sp.size, n, heads, dim)  # block j: sequence slice j, back to group rank j
    got = _Exchange.apply(blocks, sp.group)  # [N (source rank = head block), n, H / N, D]
    return got.permute(1, 0, 2, 3).reshape(n, sp.size * heads, dim)[None]


def attention(kernel_fn, query, key, value, sp: SequenceParallel):
    """Run ``kernel_fn(query, key, value) -> (output [1, T, h, D], weights)`` on the whole row with this
    rank's heads, from and back to this rank's slice of the sequence with all heads."""
    out, _ = kernel_fn(heads_to_sequence(query, sp), heads_to_sequence(key, sp), heads_to_sequence(value, sp))
    return sequence_to_heads(out, sp), None


# --------------------------------------------------------------------------- checkpoints


def check_resume_size(folder, state: dict, size: int, global_batch_size: int) -> None:
    """Refuse to resume a checkpoint saved with another ``train.sequence_parallel_size`` unless the global
    batch is the same. ZeRO spans every rank whatever the size, so the saved states load as they are (or
    through the universal form when the world size changed too); only the data position, counted in
    global batches, must keep its meaning. Checkpoints from before the size was recorded were saved with 1."""
    from training.checkpoint import ResumeError

    saved = state.get("sequence_parallel_size", 1)
    saved_batch = state.get("global_batch_size")
    if saved != size and saved_batch != global_batch_size:
        raise ResumeError(
            f"{folder} was saved with train.sequence_parallel_size {saved} and global batch {saved_batch}, but this "
            f"run has train.sequence_parallel_size {size} and global batch {global_batch_size}; set "
            f"train.global_batch_size: {saved_batch} (or train.sequence_parallel_size: {saved}), or start a new "
            f"output_dir")
