"""ZeRO-3 loading streams each rank's partition from the checkpoint and equals transformers' loading.

Unit tests pair checkpoint names with model tensors; the ``dist`` test loads tied, untied, sharded and
mismatched checkpoints and a tiny Mixtral (stored per expert, fused by transformers: a fallback) on 2 gloo ranks through the real ``deepspeed`` launcher, both ways, and compares
the gathered weights bit for bit (the same fp32 values converted by the same ``copy_``: no tolerance).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.training.test_export import _free_port, require
from training.shard_writer import INDEX_FILE, ShardReader
from training.zero3_load import checkpoint_folder, fallback_reason, plan_load

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("zero3_load_worker.py")
FALLBACK_CASES = ("unprefixed", "mixtral")


def _tiny_llama(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))


def _tiny_mixtral():
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(3)
    return AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False))


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_plan_pairs_every_tensor_once_and_tied_weights_by_either_name():
    model = _tiny_llama(tied=True)
    shapes = _shapes(model)
    shapes.pop("lm_head.weight")  # save_pretrained stores a tied weight once
    plan = plan_load(model, shapes)
    assert sorted(name for name, _ in plan.params) == sorted(shapes)
    assert plan.buffers == []  # rotary frequencies are not persistent


@pytest.mark.parametrize("change, reason", [
    (lambda s: s.pop("model.norm.weight"), "no checkpoint tensor for model.norm.weight"),
    (lambda s: s.update({"model.extra.weight": (2,)}), "1 tensor(s) the model does not, such as model.extra.weight"),
    (lambda s: s.update({"model.norm.weight": (65,)}), "model.norm.weight is (65,) in the checkpoint but (64,)"),
    (lambda s: s.update({"lm_head.weight": (512, 64)}), "2 checkpoint tensors (model.embed_tokens.weight, lm_head"),
])
def test_plan_says_why_names_do_not_pair(change, reason):
    model = _tiny_llama(tied=True)
    shapes = _shapes(model)
    shapes.pop("lm_head.weight")
    change(shapes)
    assert reason in plan_load(model, shapes)


def test_fallback_for_hub_ids_quantized_and_nvme(tmp_path):
    assert "not a local folder" in fallback_reason("org/some-model", {})
    _tiny_llama(tied=True).save_pretrained(tmp_path)
    assert checkpoint_folder(str(tmp_path)) == tmp_path
    assert fallback_reason(str(tmp_path), {"zero_optimization": {"stage": 3}}) is None
    nvme = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}
    assert fallback_reason(str(tmp_path), nvme) == "parameters are offloaded to NVMe"
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "x"}}))
    assert fallback_reason(str(tmp_path), {}) == "the checkpoint is quantized"


def test_shard_reader_rows_are_the_tensors_rows(tmp_path):
    model = _tiny_llama(tied=False)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / INDEX_FILE).is_file()
    reader = ShardReader(tmp_path, window_bytes=1)  # reopen the file on every read
    for name in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        whole = reader.get(name)
        assert torch.equal(reader.get_rows(name, 3, 7), whole[3:7])


# --------------------------------------------------------------------------- 2 ranks


def _cases(tiny_model_dir: Path, root: Path) -> list[dict]:
    untied = root / "untied"
    _tiny_llama(tied=False, seed=1).save_pretrained(untied)
    sharded = root / "sharded"
    _tiny_llama(tied=False, seed=2).save_pretrained(sharded, max_shard_size="100KB")
    assert len(json.loads((sharded / INDEX_FILE).read_text())["weight_map"]) > 3
    # Saved without the base model's prefix: transformers adds it, the streaming loader must hand over.
    unprefixed = root / "unprefixed"
    shutil.copytree(tiny_model_dir, unprefixed)
    weights = load_file(unprefixed / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in weights.items()}, unprefixed / "model.safetensors",
              metadata={"format": "pt"})
    mixtral = root / "mixtral"
    _tiny_mixtral().save_pretrained(mixtral)
    return [{"name": "tied", "folder": str(tiny_model_dir), "precision": "bf16", "train": True},
            {"name": "mixtral", "folder": str(mixtral), "precision": "bf16"},
            {"name": "untied", "folder": str(untied), "precision": "bf16"},
            {"name": "sharded", "folder": str(sharded), "precision": "fp32", "train": True},
            {"name": "unprefixed", "folder": str(unprefixed), "precision": "bf16"}]


@pytest.fixture(scope="module")
def compared(tiny_model_dir, tmp_path_factory) -> dict[int, dict[str, dict]]:
    """{rank: {case: what the worker found}} from one 2-rank run."""
    require(shutil.which("deepspeed") is not None, "the deepspeed launcher")
    root = tmp_path_factory.mktemp("zero3-load")
    cases = root / "cases.json"
    cases.write_text(json.dumps(_cases(tiny_model_dir, root)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), str(WORKER),
           "--cases", str(cases), "--out", str(root)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {rank: {c["name"]: c for c in json.loads((root / f"rank{rank}.json").read_text())} for rank in (0, 1)}


@pytest.mark.dist
@pytest.mark.parametrize("case", ["tied", "untied", "sharded", "mixtral", "unprefixed"])
def test_zero3_loading_equals_transformers_bit_for_bit(compared, case):
    for rank in (0, 1):
        found = compared[rank][case]
        assert found["names"] and found["differ"] == [], f"rank {rank}: {found['differ'][:5]}"
        assert found["describe_equal"], f"rank {rank}: config, generation config, mode or tying differ"
        assert found["tied"] == (case in ("tied", "unprefixed"))
        # Both hand over to from_pretrained: one lacks the base prefix, the other stores Mixtral's experts
        # one by one where transformers 5 fuses them (its weight conversions are not reimplemented).
        assert found["streamed"] == (case not in FALLBACK_CASES), f"rank {rank}: streamed {found['streamed']}"


@pytest.mark.dist
@pytest.mark.parametrize("case", ["tied", "untied", "sharded"])
def test_each_rank_reads_only_its_partition(compared, case):
    for rank in (0, 1):
        found = compared[rank][case]
        share = found["read_elements"] / found["total_elements"]
        # Half the model plus the partial rows at each slice's ends (at most 2 rows of <= 160 per tensor).
        assert 0.45 <= share <= 0.6, f"rank {rank} read {share:.2f} of the checkpoint"


@pytest.mark.dist
@pytest.mark.parametrize("case", ["tied", "sharded"])
def test_training_losses_are_unchanged(compared, case):
    for rank in (0, 1):
        found = compared[rank][case]
        assert len(found["losses"]) == 3 and found["losses"] == found["transformers_losses"]
