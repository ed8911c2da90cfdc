"""training.model: loading, gradient checkpointing equivalence, packed attention, the token loss."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from training.config import ModelConfig
from training.model import (
    ModelError, apply_gradient_checkpointing, decoder_layers, forward_logits, load_model, token_loss,
)


def _load(model_dir, precision="fp32", **model_kwargs):
    cfg = ModelConfig(name_or_path=str(model_dir), **model_kwargs)
    torch.manual_seed(0)
    return load_model(cfg, precision, {"zero_optimization": {"stage": 2}})


def _packed_batch(vocab_size: int, doc_lengths_per_row: list[list[int]], seed: int = 0):
    """Rows of packed documents padded to the longest row; labels -100 at document starts and padding."""
    gen = torch.Generator().manual_seed(seed)
    length = max(sum(row) for row in doc_lengths_per_row)
    rows = len(doc_lengths_per_row)
    batch = {"input_ids": torch.zeros(rows, length, dtype=torch.long),
             "labels": torch.full((rows, length), -100, dtype=torch.long),
             "position_ids": torch.zeros(rows, length, dtype=torch.long),
             "attention_mask": torch.zeros(rows, length, dtype=torch.long)}
    docs = []
    for r, lengths in enumerate(doc_lengths_per_row):
        start = 0
        for n in lengths:
            ids = torch.randint(10, vocab_size, (n,), generator=gen)
            batch["input_ids"][r, start:start + n] = ids
            batch["labels"][r, start + 1:start + n] = ids[1:]
            batch["position_ids"][r, start:start + n] = torch.arange(n)
            batch["attention_mask"][r, start:start + n] = 1
            docs.append((r, start, ids))
            start += n
    return batch, docs


def _single(ids: torch.Tensor) -> dict:
    labels = ids.clone()
    labels[0] = -100
    n = ids.numel()
    return {"input_ids": ids[None], "labels": labels[None], "position_ids": torch.arange(n)[None],
            "attention_mask": torch.ones(1, n, dtype=torch.long)}


# --------------------------------------------------------------------------- loading


def test_load_model_precision_cache_and_training_mode(tiny_model_dir):
    model = _load(tiny_model_dir, precision="bf16")
    assert model.dtype == torch.bfloat16
    assert model.config.use_cache is False
    assert model.config._attn_implementation == "sdpa"
    assert _load(tiny_model_dir, precision="fp32").dtype == torch.float32


def test_missing_attention_implementation_names_the_key(tiny_model_dir):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ModelError, match=r"model\.attn_implementation.*flash_attention_2"):
        _load(tiny_model_dir, attn_implementation="flash_attention_2")


def test_unknown_precision_is_refused(tiny_model_dir):
    with pytest.raises(ModelError, match=r"train\.precision"):
        _load(tiny_model_dir, precision="fp8")


def test_zero3_init_config_parses_before_batch_sizes_are_resolved():
    from training.model import _init_only_config

    shipped = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
               "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": True},
               "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    cfg = _init_only_config(shipped)
    assert "auto" not in cfg.values()
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) \
        == (1, 1, 1)
    assert cfg["zero_optimization"] == shipped["zero_optimization"] and cfg["bf16"] == {"enabled": True}
    resolved = {**shipped, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
                "train_batch_size": 16, "gradient_clipping": 1.0}
    assert _init_only_config(resolved) == resolved


# --------------------------------------------------------------------------- gradient checkpointing


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss_sum, count = token_loss(forward_logits(model, batch), batch["labels"])
    (loss_sum / count).backward()
    return (loss_sum / count).detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode, expected_layers", [("full", [0, 1]), ("every_k", [0])])
def test_checkpointing_keeps_loss_and_gradients(tiny_model_dir, mode, expected_layers):
    reference = _load(tiny_model_dir)
    batch, _ = _packed_batch(reference.config.vocab_size, [[9, 14], [6]])
    ref_loss, ref_grads = _loss_and_grads(reference, batch)

    model = _load(tiny_model_dir, gradient_checkpointing=mode, checkpoint_every_k_layers=2)
    # Count how often each layer's attention runs: a checkpointed layer runs again during backward.
    calls = [0] * len(decoder_layers(model))
    for i, layer in enumerate(decoder_layers(model)):
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    loss, grads = _loss_and_grads(model, batch)

    assert calls == [2 if i in expected_layers else 1 for i in range(len(calls))]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_every_k_selects_every_kth_layer(tiny_model_dir):
    model = _load(tiny_model_dir)
    assert apply_gradient_checkpointing(model, "every_k", 1) == [0, 1]
    model = _load(tiny_model_dir)
    assert apply_gradient_checkpointing(model, "every_k", 3) == [0]
    assert apply_gradient_checkpointing(_load(tiny_model_dir), "none") == []


def test_checkpointing_does_not_recompute_in_eval(tiny_model_dir):
    model = _load(tiny_model_dir, gradient_checkpointing="full")
    model.eval()
    batch, _ = _packed_batch(model.config.vocab_size, [[8]])
    calls = []
    decoder_layers(model)[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        forward_logits(model, batch)
    assert len(calls) == 1


# --------------------------------------------------------------------------- packed sequences


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_documents_run_one_by_one(tiny_model_dir, attn):
    model = _load(tiny_model_dir, attn_implementation=attn)
    model.eval()
    vocab = model.config.vocab_size
    batch, docs = _packed_batch(vocab, [[7, 12, 5], [9], [4, 6]])
    with torch.no_grad():
        logits = forward_logits(model, batch)
        packed_sum, packed_count = token_loss(logits, batch["labels"])
        doc_sum, doc_count = torch.zeros(()), 0
        for row, start, ids in docs:
            single = _single(ids)
            single_logits = forward_logits(model, single)
            torch.testing.assert_close(logits[row, start:start + ids.numel()], single_logits[0],
                                       rtol=1e-4, atol=1e-4)
            s, c = token_loss(single_logits, single["labels"])
            doc_sum, doc_count = doc_sum + s, doc_count + int(c)
    assert torch.isfinite(logits).all(), "padding produced NaN/inf logits"
    assert int(packed_count) == doc_count == sum(ids.numel() - 1 for _, _, ids in docs)
    torch.testing.assert_close(packed_sum / packed_count, doc_sum / doc_count, rtol=1e-5, atol=1e-5)


def test_without_the_document_mask_documents_leak(tiny_model_dir):
    """The control for the test above: with a 2D padding mask (needed once a batch has padding),
    restarting position_ids alone lets documents see each other."""
    model = _load(tiny_model_dir)
    model.eval()
    batch, docs = _packed_batch(model.config.vocab_size, [[7, 12], [5]])
    row, start, ids = docs[1]
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=batch["attention_mask"]).logits
        alone = forward_logits(model, _single(ids))
    assert (leaky[row, start:start + ids.numel()] - alone[0]).abs().max() > 1e-3


# --------------------------------------------------------------------------- loss


def test_token_loss_sums_shifted_cross_entropy_in_fp32():
    logits = torch.randn(2, 4, 5, dtype=torch.bfloat16)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, 4, -100, 0]])
    loss_sum, count = token_loss(logits, labels)
    expected = 0.0
    for b, t in [(0, 1), (0, 2), (1, 1), (1, 3)]:
        expected += -torch.log_softmax(logits[b, t - 1].float(), dim=-1)[labels[b, t]]
    assert loss_sum.dtype == torch.float32
    assert int(count) == 4
    torch.testing.assert_close(loss_sum, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "llama"])
def test_moe_blocks_become_zero3_leaves_and_nothing_else(kind):
    from deepspeed.utils import z3_leaf_module
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2MoeConfig

    from training.model import mark_moe_leaf_modules

    common = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1)
    config = {"mixtral": lambda: MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common),
              "qwen2_moe": lambda: Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                                  shared_expert_intermediate_size=48, **common),
              "llama": lambda: LlamaConfig(**common)}[kind]()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    classes = mark_moe_leaf_modules(model)
    leaves = [name for name, m in model.named_modules() if z3_leaf_module(m)]
    if kind == "llama":
        assert classes == [] and leaves == []
    else:
        assert leaves == ["model.layers.0.mlp", "model.layers.1.mlp"]
        assert [c.__name__ for c in classes] == [type(model.model.layers[0].mlp).__name__]
