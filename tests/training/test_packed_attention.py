"""Packed sdpa run one document at a time: exact against each document alone and against the dense mask."""

from __future__ import annotations

import pytest
import torch

from training.model import DOC_BOUNDS_KWARG, document_attention_mask, document_bounds, forward_logits, token_loss


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def _packed_batch(vocab: int, lengths_per_row: list[list[int]], total: int, seed: int = 0) -> dict:
    """Rows of back-to-back documents (restarting position_ids), padded on the right to ``total``."""
    gen = torch.Generator().manual_seed(seed)
    rows = len(lengths_per_row)
    batch = {"input_ids": torch.zeros(rows, total, dtype=torch.long),
             "position_ids": torch.zeros(rows, total, dtype=torch.long),
             "attention_mask": torch.zeros(rows, total, dtype=torch.long)}
    for r, lengths in enumerate(lengths_per_row):
        at = 0
        for n in lengths:
            batch["input_ids"][r, at:at + n] = torch.randint(4, vocab, (n,), generator=gen)
            batch["position_ids"][r, at:at + n] = torch.arange(n)
            at += n
        batch["attention_mask"][r, :at] = 1
    batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    batch["labels"][batch["position_ids"] == 0] = -100
    return batch


def test_document_bounds_split_at_restarts_and_keep_padding_apart():
    batch = _packed_batch(100, [[3, 4], [5]], total=8)
    assert document_bounds(batch["position_ids"], batch["attention_mask"]) == [[(0, 3), (3, 7), (7, 8)],
                                                                                [(0, 5), (5, 8)]]


def test_document_bounds_refuse_padding_that_is_not_trailing():
    batch = _packed_batch(100, [[4]], total=6)
    batch["attention_mask"] = torch.tensor([[0, 1, 1, 1, 1, 0]])
    assert document_bounds(batch["position_ids"], batch["attention_mask"]) is None


def test_packed_logits_equal_each_document_alone(tiny_model_dir):
    model = _model(tiny_model_dir).eval()
    lengths = [[7, 12, 5], [20]]
    batch = _packed_batch(model.config.vocab_size, lengths, total=24)
    with torch.no_grad():
        packed = forward_logits(model, batch)
        for r, row in enumerate(lengths):
            at = 0
            for n in row:
                alone = model(input_ids=batch["input_ids"][r:r + 1, at:at + n], use_cache=False).logits
                assert torch.allclose(packed[r, at:at + n], alone[0], atol=1e-5), (r, at, n)
                at += n


def test_bounds_path_matches_dense_mask_in_loss_and_gradients(tiny_model_dir):
    model = _model(tiny_model_dir).train()
    batch = _packed_batch(model.config.vocab_size, [[9, 6, 11], [4, 17]], total=26, seed=1)

    def loss_and_grads(**extra):
        model.zero_grad()
        mask = document_attention_mask(batch["position_ids"], batch["attention_mask"])
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
                       use_cache=False, **extra).logits
        loss, _ = token_loss(logits, batch["labels"])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    forward_logits(model, batch)  # installs the sdpa wrapper
    dense_loss, dense_grads = loss_and_grads()
    bounds = document_bounds(batch["position_ids"], batch["attention_mask"])
    packed_loss, packed_grads = loss_and_grads(**{DOC_BOUNDS_KWARG: bounds})
    assert torch.allclose(packed_loss, dense_loss, rtol=1e-5)
    assert dense_grads.keys() == packed_grads.keys()
    for name, grad in dense_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_wrapped_sdpa_without_bounds_is_plain_sdpa(tiny_model_dir):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = _model(tiny_model_dir).eval()
    forward_logits(model, _packed_batch(model.config.vocab_size, [[3, 5]], total=8))  # installs the wrapper
    wrapped = ALL_ATTENTION_FUNCTIONS["sdpa"]
    original = wrapped._zerotune_original
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(2)
    heads, kv_heads, dim = model.config.num_attention_heads, model.config.num_key_value_heads, attn.head_dim
    q = torch.randn(2, heads, 9, dim, generator=gen)
    k, v = torch.randn(2, kv_heads, 9, dim, generator=gen), torch.randn(2, kv_heads, 9, dim, generator=gen)
    got, _ = wrapped(attn, q, k, v, None, scaling=attn.scaling)
    want, _ = original(attn, q, k, v, None, scaling=attn.scaling)
    assert torch.equal(got, want)


@pytest.mark.parametrize("lengths", [[[16]], [[10, 6]]])
def test_forward_logits_unchanged_by_the_bounds_path(tiny_model_dir, lengths):
    """One document per row (no mask, causal kernel) and packed rows give the dense-mask logits."""
    model = _model(tiny_model_dir).eval()
    batch = _packed_batch(model.config.vocab_size, lengths, total=16, seed=3)
    with torch.no_grad():
        got = forward_logits(model, batch)
        mask = document_attention_mask(batch["position_ids"], batch["attention_mask"])
        want = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
                     use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5)
