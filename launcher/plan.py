"""`zerotune plan`: parameters, per-GPU memory for each ZeRO stage, the stage to use, and batch arithmetic.

Sources of the formulas (bytes, per GPU, N = data-parallel GPUs, P = parameters, L = largest layer's
parameters):
  * Model states, mixed precision Adam: DeepSpeed's own estimators
    (``estimate_zero2_model_states_mem_needs`` and ``estimate_zero3_model_states_mem_needs``):
    16-bit params 2P, 16-bit grads 2P, and 16P of fp32 grads, fp32 master params and Adam moments.
    stage 0: 20P; stage 1: 4P + 16P/N; stage 2: 2P + 18P/N; stage 3: 4L + 18P/N;
    stage 3 + offload (optimizer and params on CPU): 4L on the GPU, 18P/nodes x 1.5 in each node's RAM.
    In fp32 (no 16-bit copies): 16P in all, partitioned the same way.
  * Activations: Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
    (2022), eq. 1 without tensor parallelism: per layer s*b*h*(34 + 5*a*s/h) bytes in 16-bit. The
    5*a*s/h term is the attention score matrix, which fused attention (sdpa, flash) does not keep, so it
    is counted only for ``attn_implementation: eager``. With gradient checkpointing a layer keeps only its
    16-bit input (2*s*b*h) and one layer at a time is recomputed in full. fp32 doubles every figure.
    With ``train.sequence_parallel_size`` S (training/sequence_parallel.py) a rank holds s/S tokens of each
    row, so every term above uses s/S, and the eager score matrix is a/S heads over all s: 5*a*s^2*b/S.
    The all-to-alls add, for the one layer in flight, send and receive copies of q, k, v and the attention
    output: 16*(s/S)*b*h bytes in 16-bit (counted only when S > 1).
  * Logits: with the chunked loss (``train.loss_chunk_tokens`` C > 0; training/loss.py) one chunk of
    min(C, b*s/S) tokens at a time: its 16-bit logits, their fp32 copy, the log-softmax and, in backward, the
    softmax gradient: 12*C*vocab bytes. With the plain loss (C = 0) b*s*vocab fp32 values and their
    gradient: 8*b*(s/S)*vocab bytes (less than the truth: the 16-bit logits and the saved log-softmax come on top).
  * Overhead: CUDA context, communication buckets and allocator fragmentation, stated as
    ``OVERHEAD_FIXED_GB`` plus ``OVERHEAD_FRACTION`` of everything else.
  * Time: training.tb.training_flops (the function MFU uses): 6*P FLOPs per trained token (Kaplan et al.
    2020; P = active parameters of a mixture of experts) plus 12*layers*h per attended (query, key) pair of
    a document (PaLM appendix B); without the documents' lengths every token is taken to attend over a whole
    sequence of seq_len (an upper bound), at ``mfu`` of a stated peak (989 TFLOP/s dense bf16 on an H100 SXM).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

GB = 1024**3
OVERHEAD_FIXED_GB = 1.0
OVERHEAD_FRACTION = 0.10
OFFLOAD_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor default
DEFAULT_PEAK_TFLOPS = 989.0
DEFAULT_MFU = 0.40
# Host RAM at the edges of a run (measured: benchmarks/RESULTS.md, "host memory at the edges of a run").
IMPORT_BASELINE_GB = 0.3  # a process that has imported torch, transformers and deepspeed
EXPORT_FIXED_GB = 0.3  # model classes, tokenizer, the 64 MiB shard read window, allocator slack
# Loading at ZeRO-0/1/2 (transformers from_pretrained): every rank holds the whole model, and global rank 0
# maps the whole checkpoint. Not measured below ZeRO-3: the ~1.25 copies from_pretrained peaked at under
# ZeRO-3 (182M bf16, 2 ranks) stand in for it.
LOAD_MODEL_COPIES_PER_RANK = 1.25
# Loading at ZeRO-3 (training.zero3_load): a rank's partition, one module built whole before zero.Init
# partitions it, the loader's read window, and this slack (allocator and gloo buffers: the largest excess
# over the other terms in 4 runs, 182M and 358M in bf16 on 2 ranks, was 0.18 GB, flat in model size).
LOAD_ZERO3_SLACK_GB = 0.2
# Export holds at most a few copies of the largest tensor at once: the fp32 source, its gather buffer, the
# converted copy and its read-back (4 + 4 + 2 + 2 bytes per element).
EXPORT_BYTES_PER_LARGEST_PARAM = 12
# Send and receive copies of q, k, v and the attention output in one layer's all-to-alls (sequence parallelism).
ALL_TO_ALL_VALUES_PER_TOKEN_HIDDEN = 8
# `zerotune plan` reports the longest sequence that fits in multiples of this many tokens.
SEQ_LEN_STEP = 1024
# The order `deepspeed.zero_stage: auto` tries: fastest first.
AUTO_ORDER = ((0, False), (1, False), (2, False), (3, False), (3, True))


class PlanError(RuntimeError):
    """A model config that cannot be read, or hardware figures that make no sense."""

    user_error = True


@dataclass
class ModelShape:
    """What the memory model needs from a Hugging Face config."""

    params: int
    largest_layer_params: int
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    model_type: str
    active_params: int = 0  # per token: a MoE model runs only its routed experts (dense: = params)


@dataclass
class StageEstimate:
    """Per-GPU (and per-node CPU) memory for one ZeRO stage."""

    stage: int
    offload: bool
    model_states_gb: float
    activations_gb: float
    logits_gb: float
    overhead_gb: float
    total_gb: float
    cpu_gb_per_node: float
    fits: bool
    why: str = ""
    longest_seq_len: int = 0  # the longest sequence that fits at this stage (same batch and SP size)


@dataclass
class Plan:
    """Everything `zerotune plan` reports."""

    model: dict
    hardware: dict
    params: int
    stages: list[StageEstimate]
    chosen: dict | None
    reason: str
    batch: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)
    step: dict = field(default_factory=dict)
    checkpoint: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# --------------------------------------------------------------------------- model shape


def model_shape(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None) -> ModelShape:
    """Count parameters of any causal LM from its config alone: weights are built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise PlanError(f"model.name_or_path {name_or_path!r}: cannot read its config.json ({first}); use a "
                        f"local folder with a config.json, or a hub name with network access") from None
    # The meta device allocates nothing; unlike accelerate's init_empty_weights it keeps tied weights tied.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # Tied weights (embeddings and LM head) are one tensor: count each once, as DeepSpeed does.
    params = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(params=params, largest_layer_params=largest, num_layers=text.num_hidden_layers,
                      hidden_size=text.hidden_size, num_heads=text.num_attention_heads,
                      vocab_size=text.vocab_size, model_type=config.model_type,
                      active_params=active_params(model, text, params))


def active_params(model, text_config, params: int) -> int:
    """Parameters one token runs through: all but the experts it is not routed to (top-k of E per MoE
    block, from ``num_experts_per_tok`` and ``num_local_experts`` / ``num_experts`` / ``n_routed_experts``)."""
    from training.model import moe_block_classes

    classes = tuple(moe_block_classes(model))
    if not classes:
        return params
    top_k = getattr(text_config, "num_experts_per_tok", None)
    experts = next((getattr(text_config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if getattr(text_config, k, None)), None)
    if not top_k or not experts:
        return params
    expert_params = sum(p.numel() for m in model.modules() if isinstance(m, classes)
                        for p in m.experts.parameters())
    return params - expert_params + expert_params * top_k // experts


# --------------------------------------------------------------------------- memory model


def model_states_bytes(params: int, largest_layer_params: int, stage: int, offload: bool,
                       total_gpus: int, num_nodes: int, mixed_precision: bool = True) -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per node) for params, grads and Adam states; see module docstring."""
    n = total_gpus
    if not mixed_precision:
        per_gpu = {0: 16 * params, 1: 8 * params + 8 * params // n, 2: 4 * params + 12 * params // n,
                   3: 4 * largest_layer_params + 16 * params // n}
    else:
        per_gpu = {0: 20 * params, 1: 4 * params + 16 * params // n, 2: 2 * params + 18 * params // n,
                   3: 4 * largest_layer_params + 18 * params // n}
    if not offload:
        return per_gpu[stage], 0
    if stage == 3:
        cpu = params * 18 / num_nodes * OFFLOAD_BUFFER_FACTOR
        return 4 * largest_layer_params, int(cpu)
    if stage == 2:
        return 2 * params, int(params * max(4 * n, 16) * OFFLOAD_BUFFER_FACTOR)
    raise PlanError(f"CPU offload needs ZeRO stage 2 or 3, not {stage}")


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, checkpointing: str,
                     every_k: int = 2, attn_implementation: str = "sdpa", mixed_precision: bool = True,
                     sequence_parallel: int = 1) -> int:
    """Activation memory of one micro batch on one rank (Korthikanti et al. 2022; see module docstring)."""
    s, b, h, a = seq_len / sequence_parallel, micro_batch, shape.hidden_size, shape.num_heads
    per_value = 34 + (5 * a * seq_len / h if attn_implementation == "eager" else 0)
    full_layer = s * b * h * per_value
    kept_layer = 2 * s * b * h
    layers = shape.num_layers
    if checkpointing == "full":
        total = layers * kept_layer + full_layer
    elif checkpointing == "every_k":
        ckpt = layers // max(1, every_k)
        total = ckpt * kept_layer + (layers - ckpt) * full_layer + (full_layer if ckpt else 0)
    else:
        total = layers * full_layer
    if sequence_parallel > 1:
        total += 2 * ALL_TO_ALL_VALUES_PER_TOKEN_HIDDEN * s * b * h
    scale = 1 if mixed_precision else 2
    return int(total * scale)


def logits_bytes(vocab_size: int, micro_batch: int, seq_len: int, loss_chunk_tokens: int = 0,
                 sequence_parallel: int = 1) -> int:
    """Loss memory of one micro batch on one rank: one chunk's logits with the chunked loss, else all fp32
    logits of the rank's tokens and their gradient (see module docstring)."""
    tokens = micro_batch * seq_len // sequence_parallel
    if loss_chunk_tokens > 0:
        return 12 * min(loss_chunk_tokens, tokens) * vocab_size
    return 8 * tokens * vocab_size


def estimate_stages(shape: ModelShape, *, micro_batch: int, seq_len: int, checkpointing: str, every_k: int,
                    attn_implementation: str, mixed_precision: bool, num_nodes: int, gpus_per_node: int,
                    gpu_memory_gb: float, cpu_memory_gb: float, loss_chunk_tokens: int = 0,
                    sequence_parallel: int = 1) -> list[StageEstimate]:
    """One StageEstimate per entry of AUTO_ORDER, each with the longest sequence that would fit."""
    step = dict(micro_batch=micro_batch, checkpointing=checkpointing, every_k=every_k,
                attn_implementation=attn_implementation, mixed_precision=mixed_precision, num_nodes=num_nodes,
                gpus_per_node=gpus_per_node, gpu_memory_gb=gpu_memory_gb, cpu_memory_gb=cpu_memory_gb,
                loss_chunk_tokens=loss_chunk_tokens, sequence_parallel=sequence_parallel)
    out = []
    for stage, offload in AUTO_ORDER:
        est = stage_estimate(shape, stage, offload, seq_len, **step)
        est.longest_seq_len = longest_seq_len(shape, stage, offload, **step)
        out.append(est)
    return out


def stage_estimate(shape: ModelShape, stage: int, offload: bool, seq_len: int, *, micro_batch: int,
                   checkpointing: str, every_k: int, attn_implementation: str, mixed_precision: bool,
                   num_nodes: int, gpus_per_node: int, gpu_memory_gb: float, cpu_memory_gb: float,
                   loss_chunk_tokens: int, sequence_parallel: int) -> StageEstimate:
    """Per-GPU (and per-node CPU) memory of one ZeRO stage at ``seq_len``; ZeRO shards over every GPU."""
    gpu, cpu = model_states_bytes(shape.params, shape.largest_layer_params, stage, offload,
                                  num_nodes * gpus_per_node, num_nodes, mixed_precision)
    act = activation_bytes(shape, micro_batch, seq_len, checkpointing, every_k, attn_implementation,
                           mixed_precision, sequence_parallel)
    logit = logits_bytes(shape.vocab_size, micro_batch, seq_len, loss_chunk_tokens, sequence_parallel)
    subtotal = (gpu + act + logit) / GB
    overhead = OVERHEAD_FIXED_GB + OVERHEAD_FRACTION * subtotal
    total = subtotal + overhead
    fits_gpu, fits_cpu = total <= gpu_memory_gb, cpu / GB <= cpu_memory_gb
    why = "" if fits_gpu and fits_cpu else (
        f"needs {total:.1f} GB per GPU > {gpu_memory_gb:g} GB" if not fits_gpu
        else f"needs {cpu / GB:.1f} GB CPU per node > {cpu_memory_gb:g} GB")
    return StageEstimate(stage, offload, round(gpu / GB, 3), round(act / GB, 3), round(logit / GB, 3),
                         round(overhead, 3), round(total, 3), round(cpu / GB, 3), fits_gpu and fits_cpu, why)


def longest_seq_len(shape: ModelShape, stage: int, offload: bool, **step) -> int:
    """The longest sequence (a multiple of SEQ_LEN_STEP) whose stage_estimate fits; 0 if none does.

    Memory grows with the sequence, so a doubling search then bisection finds it in ~2 log2(T) estimates.
    """
    def fits(seq_len: int) -> bool:
        return stage_estimate(shape, stage, offload, seq_len, **step).fits

    if not fits(SEQ_LEN_STEP):
        return 0
    low, high = 1, 2  # in units of SEQ_LEN_STEP: low fits, high is tried next
    while fits(high * SEQ_LEN_STEP) and high < 2**20:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid * SEQ_LEN_STEP) else (low, mid)
    return low * SEQ_LEN_STEP


def choose_stage(stages: list[StageEstimate], requested) -> tuple[dict | None, str]:
    """The configured stage, or with ``auto`` the fastest that fits; the reason in words."""
    if requested not in (None, "auto"):
        match = [s for s in stages if s.stage == requested and not s.offload]
        est = match[0]
        verdict = "fits" if est.fits else f"does NOT fit: {est.why}"
        return {"stage": est.stage, "offload": False}, f"deepspeed.zero_stage {requested} as configured; {verdict}"
    for est in stages:
        if est.fits:
            skipped = [f"{_label(s)} ({s.why})" for s in stages[:stages.index(est)]]
            tail = f"; faster stages do not fit: {', '.join(skipped)}" if skipped else ""
            return ({"stage": est.stage, "offload": est.offload},
                    f"{_label(est)} is the fastest stage that fits ({est.total_gb:.1f} GB per GPU){tail}")
    detail = ", ".join(f"{_label(s)} {s.why}" for s in stages)
    return None, f"fits nowhere: {detail}; add GPUs or nodes, enable gradient checkpointing, or lower the micro batch"


def _label(est: StageEstimate) -> str:
    return f"ZeRO-{est.stage}{' + CPU offload' if est.offload else ''}"


# --------------------------------------------------------------------------- checkpoints

# Assumed aggregate checkpoint write speed per node (parallel file system, every rank writing its shard).
CHECKPOINT_WRITE_GB_PER_S_PER_NODE = 1.0


def checkpoint_estimate(params: int, precision: str, num_nodes: int) -> dict:
    """Bytes of a full checkpoint (weights in the training precision; fp32 master weights when training in
    16 bits; Adam's two fp32 moments) and its save time at CHECKPOINT_WRITE_GB_PER_S_PER_NODE per node."""
    per_param = 4 + 8 if precision == "fp32" else 2 + 4 + 8
    size = per_param * params
    return {"bytes": size, "gb": round(size / GB, 2),
            "estimated_save_seconds": round(size / GB / (CHECKPOINT_WRITE_GB_PER_S_PER_NODE * num_nodes), 1)}


# --------------------------------------------------------------------------- host memory


def host_memory(shape: ModelShape, precision: str, stage: int, gpus_per_node: int, total_gpus: int,
                cpu_memory_gb: float) -> dict:
    """Host RAM a node needs to load the model at the start of training, and that ``zerotune export``
    needs (one process, any stage), with a warning for each that exceeds ``cpu_memory_gb``.

    Loading (:func:`loading_bytes_per_rank`) costs every rank of the node. Where it does not stream, the
    node of global rank 0 also holds the checkpoint it reads (assumed stored in the training precision). Export
    streams (training.export): a fixed cost plus a few copies of the largest tensor, whatever the model's
    size.
    """
    width = 4 if precision == "fp32" else 2
    loading = gpus_per_node * loading_bytes_per_rank(shape, width, stage, total_gpus)
    if not streams_loading(shape, stage):
        loading += width * shape.params
    export = (IMPORT_BASELINE_GB + EXPORT_FIXED_GB) * GB + EXPORT_BYTES_PER_LARGEST_PARAM * shape.largest_layer_params
    out = {"loading_gb_per_node": round(loading / GB, 2), "export_gb": round(export / GB, 2), "warnings": []}
    for what, need in (("loading the model (ZeRO-%d, per node)" % stage, out["loading_gb_per_node"]),
                       ("zerotune export", out["export_gb"])):
        if need > cpu_memory_gb:
            out["warnings"].append(f"{what} needs ~{need:.1f} GB of host RAM > --cpu-memory-gb {cpu_memory_gb:g}")
    return out


def loading_bytes_per_rank(shape: ModelShape, width: int, stage: int, total_gpus: int) -> float:
    """Host bytes one rank peaks at while loading the model, ``width`` bytes per parameter.

    ZeRO-3 streams each rank's partition from the checkpoint (training.zero3_load): the partition, the
    largest module built whole before ``zero.Init`` partitions it, the read window and a measured slack.
    At 70B on 64 ranks in bf16: 2.2 GB of partition + 2.1 GB of embedding + slack, about 5 GB per rank.
    Other stages, and MoE checkpoints (their experts stored one by one, fused by transformers), load
    through transformers' ``from_pretrained`` (LOAD_MODEL_COPIES_PER_RANK copies).
    """
    from training.zero3_load import READ_WINDOW_BYTES

    if streams_loading(shape, stage):
        return (IMPORT_BASELINE_GB * GB + width * shape.params / total_gpus + width * shape.largest_layer_params
                + READ_WINDOW_BYTES + LOAD_ZERO3_SLACK_GB * GB)
    return IMPORT_BASELINE_GB * GB + LOAD_MODEL_COPIES_PER_RANK * width * shape.params


def streams_loading(shape: ModelShape, stage: int) -> bool:
    """Whether training.zero3_load streams this model: ZeRO-3, and not a MoE model (fewer active than total
    parameters), whose checkpoint names need transformers' expert fusion."""
    return stage == 3 and shape.active_params in (0, shape.params)


# --------------------------------------------------------------------------- batch arithmetic and time


def batch_arithmetic(cfg, world_size: int, shape: ModelShape, peak_tflops: float, mfu: float) -> dict:
    """Tokens per optimizer step, steps per epoch and in total (from the manifest if prepared), wall time."""
    from training.steps import data_parallel_size, plan_steps, resolve_batch

    t = cfg.train
    data_parallel = data_parallel_size(world_size, t.sequence_parallel_size)
    micro, accum = resolve_batch(t.micro_batch_size, t.gradient_accumulation_steps, t.global_batch_size,
                                 data_parallel)
    seqs_per_step = micro * accum * data_parallel
    out = {"world_size": world_size, "data_parallel": data_parallel,
           "sequence_parallel": t.sequence_parallel_size, "sequences_per_step": seqs_per_step,
           "max_tokens_per_step": seqs_per_step * cfg.data.seq_len,
           "peak_tflops": peak_tflops, "mfu": mfu}
    manifest_path = Path(cfg.data.output_dir) / "manifest.json"
    if not manifest_path.is_file():
        out["data"] = f"not prepared ({manifest_path} missing): run `zerotune prep` for steps and time"
        steps = t.max_steps
        tokens_per_step = out["max_tokens_per_step"]
    else:
        train = json.loads(manifest_path.read_text(encoding="utf-8"))["splits"]["train"]
        steps_plan = plan_steps(t, train["sequences"], world_size)
        steps_per_epoch, steps = steps_plan.steps_per_epoch, steps_plan.total_steps
        tokens_per_step = int(train["tokens"] / max(1, train["sequences"]) * seqs_per_step)
        out.update(data=str(manifest_path), train_sequences=train["sequences"], train_tokens=train["tokens"],
                   steps_per_epoch=steps_per_epoch)
    out["tokens_per_step"] = tokens_per_step
    out["total_steps"] = steps
    from training.tb import training_flops

    step_flops = training_flops(shape.active_params or shape.params, shape.num_layers, shape.hidden_size,
                                tokens_per_step, tokens_per_step * cfg.data.seq_len)
    if steps is not None:
        seconds = steps * step_flops / (world_size * peak_tflops * 1e12 * mfu)
        out["estimated_seconds"] = seconds
        out["estimated_hours"] = round(seconds / 3600, 2)
    return out


def make_plan(cfg, num_nodes: int = 1, gpus_per_node: int = 8, gpu_memory_gb: float = 80.0,
              cpu_memory_gb: float = 1024.0, peak_tflops: float = DEFAULT_PEAK_TFLOPS,
              mfu: float = DEFAULT_MFU) -> Plan:
    """Build the whole plan for a loaded RunConfig and the given hardware."""
    if min(num_nodes, gpus_per_node) < 1 or min(gpu_memory_gb, cpu_memory_gb) <= 0:
        raise PlanError("--nodes and --gpus-per-node must be >= 1, memory sizes > 0")
    shape = model_shape(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.revision)
    mixed = cfg.train.precision != "fp32"
    stages = estimate_stages(shape, micro_batch=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len,
                             checkpointing=cfg.model.gradient_checkpointing,
                             every_k=cfg.model.checkpoint_every_k_layers,
                             attn_implementation=cfg.model.attn_implementation, mixed_precision=mixed,
                             num_nodes=num_nodes, gpus_per_node=gpus_per_node, gpu_memory_gb=gpu_memory_gb,
                             cpu_memory_gb=cpu_memory_gb, loss_chunk_tokens=cfg.train.loss_chunk_tokens,
                             sequence_parallel=cfg.train.sequence_parallel_size)
    chosen, reason = choose_stage(stages, cfg.deepspeed.zero_stage)
    hardware = {"nodes": num_nodes, "gpus_per_node": gpus_per_node, "gpu_memory_gb": gpu_memory_gb,
                "cpu_memory_gb": cpu_memory_gb}
    batch = batch_arithmetic(cfg, num_nodes * gpus_per_node, shape, peak_tflops, mfu)
    host = host_memory(shape, cfg.train.precision, chosen["stage"] if chosen else 3, gpus_per_node,
                       num_nodes * gpus_per_node, cpu_memory_gb)
    return Plan(model=asdict(shape), hardware=hardware, params=shape.params, stages=stages, chosen=chosen,
                reason=reason, batch=batch, host=host, step=step_kernels(cfg),
                checkpoint=checkpoint_estimate(shape.params, cfg.train.precision, num_nodes))


def step_kernels(cfg) -> dict:
    """The attention kernel and the loss the run will use (training.attention.choose_attention decides on
    the training machine; this one may have no GPU)."""
    from training.attention import AttentionUnavailable, choose_attention
    from training.loss import describe_loss

    requested = cfg.model.attn_implementation
    try:
        here = choose_attention(requested).describe().removeprefix("attention: ")
    except AttentionUnavailable as exc:
        here = f"not usable on this machine ({str(exc).split(': ', 2)[-1]})"
    rule = ("auto: a varlen kernel on CUDA (flash_attention_2 if installed, else torch varlen_attn), else "
            "flex_attention on CUDA, else sdpa; " if requested == "auto" else "")
    return {"attention": f"{rule}here {here}", "loss": describe_loss(cfg.train.loss_chunk_tokens)}


def _sp_note(batch: dict) -> str:
    sp = batch["sequence_parallel"]
    return f" = {batch['world_size']} ranks / sequence parallelism {sp}" if sp > 1 else ""


def format_plan(plan: Plan) -> str:
    """The human-readable table."""
    m, hw, b = plan.model, plan.hardware, plan.batch
    active = f", {m['active_params']:,} active per token" if m["active_params"] != plan.params else ""
    lines = [f"model: {m['model_type']}, {plan.params:,} parameters ({plan.params / 1e9:.2f} B){active}, "
             f"{m['num_layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}",
             f"hardware: {hw['nodes']} node(s) x {hw['gpus_per_node']} GPU(s), {hw['gpu_memory_gb']:g} GB per GPU, "
             f"{hw['cpu_memory_gb']:g} GB CPU per node", "",
             f"{'stage':<22}{'states':>9}{'activ.':>9}{'logits':>9}{'overhd':>9}{'total':>9}{'CPU/node':>10}  fits"
             f"{'longest seq':>13}", "-" * 97]
    for s in plan.stages:
        lines.append(f"{_label(s):<22}{s.model_states_gb:>9.2f}{s.activations_gb:>9.2f}{s.logits_gb:>9.2f}"
                     f"{s.overhead_gb:>9.2f}{s.total_gb:>9.2f}{s.cpu_gb_per_node:>10.1f}  {'yes' if s.fits else 'no ':<3}"
                     f"{s.longest_seq_len:>13,}")
    lines += ["(GB per GPU; overhead = %.1f GB + %d%% of the rest; longest seq: the longest sequence that fits, "
              "same micro batch and sequence parallelism %d)" % (OVERHEAD_FIXED_GB, OVERHEAD_FRACTION * 100,
                                                                 b["sequence_parallel"]),
              "", f"chosen: {plan.reason}",
              f"host RAM: loading ~{plan.host['loading_gb_per_node']:.1f} GB per node, export "
              f"~{plan.host['export_gb']:.1f} GB", *[f"warning: {w}" for w in plan.host["warnings"]], "",
              f"attention: {plan.step['attention']}", f"loss: {plan.step['loss']}", "",
              f"batch: {b['sequences_per_step']} sequences per optimizer step "
              f"(micro x accumulation x {b['data_parallel']} data-parallel ranks"
              f"{_sp_note(b)}), ~{b['tokens_per_step']:,} tokens per step"]
    if "steps_per_epoch" in b:
        lines.append(f"data: {b['train_sequences']:,} training sequences -> {b['steps_per_epoch']} steps per epoch, "
                     f"{b['total_steps']} steps in total")
    else:
        lines.append(f"data: {b['data']}")
    if "estimated_hours" in b:
        secs = b["estimated_seconds"]
        span = f"{secs / 3600:.1f} h" if secs >= 3600 else f"{secs / 60:.1f} min" if secs >= 60 else f"{secs:.1f} s"
        lines.append(f"time: ~{span} at {b['mfu']:.0%} MFU of {b['peak_tflops']:g} TFLOP/s "
                     f"per GPU (6 x params + attention FLOPs per token)")
    return "\n".join(lines)
