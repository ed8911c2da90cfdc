"""`zerotune plan` figures: parameter counts from config only, model states against DeepSpeed's estimators."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from launcher.plan import (activation_bytes, logits_bytes, make_plan,
                           model_shape, model_states_bytes)
from training.config import config_from_dict

# Small but real shapes of three families; only config.json is written (no weights anywhere).
CONFIGS = {
    "llama": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 3000,
              "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 3,
              "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 5000,
              "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", "hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 2,
                "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 4000,
                "tie_word_embeddings": False},
}


def _write(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIGS[name]))
    return folder


def _expected_llama_like(c):
    """Parameters of a Llama-shaped decoder written out by hand (bias-free, RMSNorm, SwiGLU)."""
    h, f, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head
    attn = h * h + 2 * h * kv + h * h
    qkv_bias = (h + 2 * kv) if c["model_type"] == "qwen2" else 0
    layer = attn + qkv_bias + 3 * h * f + 2 * h
    embed = V * h * (1 if c["tie_word_embeddings"] else 2)
    return L * layer + embed + h


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_count_from_config_only(tmp_path, name):
    shape = model_shape(str(_write(tmp_path, name)))
    assert shape.params == _expected_llama_like(CONFIGS[name])
    assert shape.largest_layer_params == CONFIGS[name]["vocab_size"] * CONFIGS[name]["hidden_size"]
    assert shape.model_type == name


MOE = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "num_local_experts": 8,
       "num_experts_per_tok": 2, "tie_word_embeddings": False}


def test_moe_counts_total_and_active_parameters(tmp_path):
    """Mixtral written out by hand: attention, router and norms always run; 2 of 8 experts per token."""
    folder = tmp_path / "mixtral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MOE))
    h, f, L, V, E = 64, 96, 2, 1000, 8
    kv = 2 * (h // 4)
    dense_per_layer = (2 * h * h + 2 * h * kv) + E * h + 2 * h  # attention, router, two norms
    experts_per_layer = E * 3 * h * f
    shape = model_shape(str(folder))
    assert shape.params == L * (dense_per_layer + experts_per_layer) + 2 * V * h + h
    assert shape.active_params == L * (dense_per_layer + experts_per_layer * 2 // E) + 2 * V * h + h
    dense = model_shape(str(_write(tmp_path, "llama")))
    assert dense.active_params == dense.params


@pytest.mark.parametrize("params, largest, gpus, nodes", [
    (8_030_261_248, 525_336_576, 8, 1), (7_000_000_000, 500_000_000, 16, 2), (1_235_814_400, 262_668_288, 1, 1)])
def test_model_states_match_deepspeed_estimators(params, largest, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_node = gpus // nodes
    _, ds2 = estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=False)
    ours2, _ = model_states_bytes(params, largest, 2, False, gpus, nodes)
    assert ours2 == pytest.approx(ds2, rel=0.05)
    _, ds3, _ = estimate_zero3_model_states_mem_needs(params, largest, per_node, nodes, cpu_offload=False)
    ours3, _ = model_states_bytes(params, largest, 3, False, gpus, nodes)
    assert ours3 == pytest.approx(ds3, rel=0.05)
    ds3_cpu, ds3_gpu, _ = estimate_zero3_model_states_mem_needs(params, largest, per_node, nodes,
                                                                cpu_offload=True, cpu_offload_params=True)
    gpu, cpu = model_states_bytes(params, largest, 3, True, gpus, nodes)
    assert gpu == pytest.approx(ds3_gpu, rel=0.05)
    assert cpu == pytest.approx(ds3_cpu, rel=0.05)
    ds2_cpu, ds2_gpu = estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=True)
    gpu, cpu = model_states_bytes(params, largest, 2, True, gpus, nodes)
    assert (gpu, cpu) == (pytest.approx(ds2_gpu, rel=0.05), pytest.approx(ds2_cpu, rel=0.05))


def test_stages_shrink_with_partitioning():
    p, l = 7_000_000_000, 500_000_000
    per_stage = [model_states_bytes(p, l, s, False, 8, 1)[0] for s in (0, 1, 2, 3)]
    assert per_stage == sorted(per_stage, reverse=True)
    assert per_stage[0] == 20 * p


def test_activation_formula_and_checkpointing(tmp_path):
    shape = model_shape(str(_write(tmp_path, "llama")))
    s, b, h, a, L = 512, 2, 256, 8, 4
    full = activation_bytes(shape, b, s, "none", attn_implementation="eager")
    assert full == L * s * b * h * (34 + 5 * a * s / h)
    assert activation_bytes(shape, b, s, "none") == L * s * b * h * 34  # fused attention keeps no scores
    ckpt = activation_bytes(shape, b, s, "full")
    assert ckpt == L * 2 * s * b * h + s * b * h * 34
    assert ckpt < activation_bytes(shape, b, s, "every_k", every_k=2) < activation_bytes(shape, b, s, "none")
    assert activation_bytes(shape, b, s, "none", mixed_precision=False) == 2 * L * s * b * h * 34
    assert logits_bytes(3000, b, s) == 8 * b * s * 3000
    assert logits_bytes(3000, b, s, loss_chunk_tokens=256) == 12 * 256 * 3000  # one chunk at a time
    assert logits_bytes(3000, b, s, loss_chunk_tokens=10**6) == 12 * b * s * 3000  # the chunk is the batch


def _cfg(tmp_path, model_dir, **over):
    raw = {"output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(model_dir)},
           "data": {"sources": ["x.csv"], "output_dir": str(tmp_path / "prep"), "seq_len": 1024},
           "train": {"micro_batch_size": 2, "gradient_accumulation_steps": 4, "epochs": 2},
           "deepspeed": {"config": "zero3.json", "zero_stage": "auto"}}
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        raw.setdefault(section, {})[leaf] = value
    return config_from_dict(raw)


def test_auto_picks_the_fastest_stage_that_fits_and_says_why(tmp_path):
    cfg = _cfg(tmp_path, _write(tmp_path, "llama"))
    roomy = make_plan(cfg, gpus_per_node=2, gpu_memory_gb=80)
    assert roomy.chosen == {"stage": 0, "offload": False}
    totals = {(s.stage, s.offload): s.total_gb for s in roomy.stages}
    # Squeeze the GPU between the stage-1 and stage-2 totals: auto must skip 0 and 1 and say so.
    budget = (totals[(1, False)] + totals[(2, False)]) / 2
    tight = make_plan(cfg, gpus_per_node=2, gpu_memory_gb=budget)
    assert tight.chosen == {"stage": 2, "offload": False}
    assert "ZeRO-2 is the fastest stage that fits" in tight.reason and "ZeRO-0" in tight.reason


def test_fits_nowhere_reports_numbers(tmp_path):
    cfg = _cfg(tmp_path, _write(tmp_path, "llama"))
    plan = make_plan(cfg, gpus_per_node=1, gpu_memory_gb=0.5)
    assert plan.chosen is None
    assert "fits nowhere" in plan.reason and "GB per GPU > 0.5 GB" in plan.reason
    assert not any(s.fits for s in plan.stages)


def test_configured_stage_is_kept_with_a_verdict(tmp_path):
    cfg = _cfg(tmp_path, _write(tmp_path, "llama"), deepspeed__zero_stage=3)
    plan = make_plan(cfg, gpus_per_node=2, gpu_memory_gb=80)
    assert plan.chosen == {"stage": 3, "offload": False}
    assert "as configured; fits" in plan.reason


def test_batch_arithmetic_with_and_without_manifest(tmp_path):
    cfg = _cfg(tmp_path, _write(tmp_path, "mistral"))
    plan = make_plan(cfg, num_nodes=2, gpus_per_node=4)
    assert plan.batch["sequences_per_step"] == 2 * 4 * 8
    assert "not prepared" in plan.batch["data"] and plan.batch["total_steps"] is None
    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "manifest.json").write_text(json.dumps({"splits": {"train": {"sequences": 1000, "tokens": 640_000}}}))
    plan = make_plan(cfg, num_nodes=2, gpus_per_node=4)
    assert plan.batch["steps_per_epoch"] == 1000 // 64
    assert plan.batch["total_steps"] == 2 * (1000 // 64)
    assert plan.batch["tokens_per_step"] == 64 * 640
    shape = plan.model
    # The same formula as MFU (training.tb.training_flops), every token attending over a whole sequence.
    flops = plan.batch["total_steps"] * 64 * 640 * (6 * plan.params + 12 * shape["num_layers"]
                                                       * shape["hidden_size"] * 1024)
    assert plan.batch["estimated_seconds"] == pytest.approx(flops / (8 * 989e12 * 0.4), rel=1e-6)


def test_plan_cli_json(tmp_path, capsys):
    from launcher.cli import main

    model = _write(tmp_path, "qwen2")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: {model}}}\n"
                   f"data: {{sources: [x.csv], output_dir: {tmp_path / 'prep'}}}\n"
                   "deepspeed: {config: zero3.json, zero_stage: auto}\n")
    assert main(["plan", str(cfg), "--gpus-per-node", "4", "--gpu-memory-gb", "40", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == _expected_llama_like(CONFIGS["qwen2"])
    assert [(s["stage"], s["offload"]) for s in out["stages"]] == [(0, False), (1, False), (2, False), (3, False),
                                                                   (3, True)]
    assert {"model_states_gb", "activations_gb", "total_gb", "fits"} <= set(out["stages"][0])
    assert out["chosen"] == {"stage": 0, "offload": False}
    assert main(["plan", str(cfg)]) == 0
    table = capsys.readouterr().out
    assert "ZeRO-3 + CPU offload" in table and "chosen:" in table
    # The attention kernel and the loss the run uses (auto is sdpa on a machine without CUDA).
    assert out["step"]["loss"] == "chunked, 1024 tokens per chunk"
    assert "attention: auto: a varlen kernel on CUDA" in table
    assert "here auto -> " + ("sdpa" if not torch.cuda.is_available() else "") in table


def test_unreadable_model_config_is_one_line(tmp_path, capsys):
    from launcher.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: {tmp_path / 'no-model'}}}\n"
                   f"data: {{sources: [x.csv], output_dir: {tmp_path / 'prep'}}}\n")
    assert main(["plan", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.name_or_path" in err and "config.json" in err


def test_host_memory_for_loading_and_export_and_its_warnings(tmp_path, capsys):
    from launcher.cli import main
    from launcher.plan import (EXPORT_BYTES_PER_LARGEST_PARAM, EXPORT_FIXED_GB, GB, IMPORT_BASELINE_GB,
                               LOAD_MODEL_COPIES_PER_RANK, LOAD_ZERO3_SLACK_GB, host_memory)
    from training.zero3_load import READ_WINDOW_BYTES

    shape = model_shape(str(_write(tmp_path, "llama")))
    P, L = shape.params, shape.largest_layer_params
    zero3 = host_memory(shape, "bf16", 3, gpus_per_node=4, total_gpus=8, cpu_memory_gb=1024)
    # ZeRO-3 streams: per rank the baseline, its 1/8 partition, the largest module whole, the read window
    # and the slack; no checkpoint held whole anywhere.
    per_rank = IMPORT_BASELINE_GB * GB + 2 * P / 8 + 2 * L + READ_WINDOW_BYTES + LOAD_ZERO3_SLACK_GB * GB
    assert zero3["loading_gb_per_node"] == round(4 * per_rank / GB, 2)
    more_nodes = host_memory(shape, "bf16", 3, gpus_per_node=4, total_gpus=16, cpu_memory_gb=1024)
    assert more_nodes["loading_gb_per_node"] == round(4 * (per_rank - 2 * P / 16) / GB, 2)
    # Below ZeRO-3 from_pretrained: ~1.25 model copies per rank; rank 0's node also holds the checkpoint.
    expected = 4 * (IMPORT_BASELINE_GB * GB + LOAD_MODEL_COPIES_PER_RANK * 2 * P) + 2 * P
    zero2 = host_memory(shape, "bf16", 2, gpus_per_node=4, total_gpus=8, cpu_memory_gb=1024)
    assert zero2["loading_gb_per_node"] == round(expected / GB, 2)
    moe = dataclasses.replace(shape, active_params=shape.params // 2)  # MoE: from_pretrained even at ZeRO-3
    assert host_memory(moe, "bf16", 3, gpus_per_node=4, total_gpus=8, cpu_memory_gb=1024) == zero2
    fp32 = host_memory(shape, "fp32", 2, gpus_per_node=4, total_gpus=8, cpu_memory_gb=1024)
    assert fp32["loading_gb_per_node"] == round((expected + 4 * 1.25 * 2 * P + 2 * P) / GB, 2)
    export = (IMPORT_BASELINE_GB + EXPORT_FIXED_GB) * GB + EXPORT_BYTES_PER_LARGEST_PARAM * L
    assert zero3["export_gb"] == fp32["export_gb"] == round(export / GB, 2) and zero3["warnings"] == []
    tight = host_memory(shape, "bf16", 3, gpus_per_node=8, total_gpus=8, cpu_memory_gb=0.5)
    assert len(tight["warnings"]) == 2 and "zerotune export needs" in tight["warnings"][1]

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: {tmp_path / 'llama'}}}\n"
                   f"data: {{sources: [x.csv], output_dir: {tmp_path / 'prep'}}}\n"
                   "deepspeed: {config: zero3.json, zero_stage: 3}\n")
    assert main(["plan", str(cfg), "--cpu-memory-gb", "0.5"]) == 0
    table = capsys.readouterr().out
    assert "host RAM: loading ~" in table and "warning: zerotune export needs" in table
    assert "warning: loading the model (ZeRO-3" in table


def test_sequence_parallel_divides_activations_and_adds_the_all_to_all_buffers(tmp_path):
    shape = model_shape(str(_write(tmp_path, "llama")))
    s, b, h, a, L, sp = 4096, 1, 256, 8, 4, 4
    assert activation_bytes(shape, b, s, "none", sequence_parallel=sp) == \
        L * (s / sp) * b * h * 34 + 16 * (s / sp) * b * h
    # eager: each rank keeps the scores of a / sp heads over the whole row
    assert activation_bytes(shape, b, s, "none", attn_implementation="eager", sequence_parallel=sp) == \
        int(L * (s / sp) * b * h * (34 + 5 * a * s / h) + 16 * (s / sp) * b * h)
    assert logits_bytes(3000, b, s, sequence_parallel=sp) == 8 * b * (s // sp) * 3000


def test_plan_prints_the_longest_sequence_per_stage_for_the_sp_size(tmp_path):
    from launcher.plan import SEQ_LEN_STEP, format_plan, stage_estimate

    model = _write(tmp_path, "llama")
    plain = make_plan(_cfg(tmp_path, model, model__gradient_checkpointing="full"), gpus_per_node=4, gpu_memory_gb=2)
    split = make_plan(_cfg(tmp_path, model, model__gradient_checkpointing="full", train__sequence_parallel_size=4),
                      gpus_per_node=4, gpu_memory_gb=2)
    for one, four in zip(plain.stages, split.stages):
        assert four.activations_gb < one.activations_gb and four.model_states_gb == one.model_states_gb
        assert four.longest_seq_len > one.longest_seq_len > 0
        step = dict(micro_batch=2, checkpointing="full", every_k=2, attn_implementation="auto",
                    mixed_precision=True, num_nodes=1, gpus_per_node=4, gpu_memory_gb=2, cpu_memory_gb=1024.0,
                    loss_chunk_tokens=1024, sequence_parallel=4)
        shape = model_shape(str(model))
        assert stage_estimate(shape, four.stage, four.offload, four.longest_seq_len, **step).fits
        assert not stage_estimate(shape, four.stage, four.offload, four.longest_seq_len + SEQ_LEN_STEP, **step).fits
    text = format_plan(split)
    assert "longest seq" in text and f"{split.stages[0].longest_seq_len:,}" in text
    assert "x 1 data-parallel ranks = 4 ranks / sequence parallelism 4" in text
    assert split.batch["sequences_per_step"] == 2 * 4 * 1
