"""Packed micro-batches as one padding-free row: every attention kernel equals each document run alone."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from training.attention import DOCUMENTS_KWARG, dense_document_mask
from training.data import Collator
from training.model import cu_seqlens_from_position_ids, flatten_batch, packed_loss

# Micro-batches of 2 and 4 rows, several documents each, padded to the longest row.
PACKINGS = {2: [[7, 12, 5], [9, 4]], 4: [[7, 12, 5], [20], [3, 3, 3, 3], [11, 1, 6]]}


def _model(model_dir, attn, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    return model


def _sequence(rng, vocab: int, lengths: list[int]) -> dict:
    """One packed sequence as the shards hold it; the first token of each document is not scored."""
    ids = rng.integers(4, vocab, sum(lengths))
    pos = np.concatenate([np.arange(n) for n in lengths])
    labels = np.where(pos == 0, -100, ids)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def _batch(vocab: int, rows: list[list[int]], seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    seqs = [_sequence(rng, vocab, lengths) for lengths in rows]
    return Collator(pad_token_id=0)(seqs), seqs


def _documents(seqs):
    for seq in seqs:
        starts = list(np.flatnonzero(seq["position_ids"] == 0)) + [len(seq["input_ids"])]
        for a, b in zip(starts[:-1], starts[1:]):
            yield torch.tensor(seq["input_ids"][a:b]), torch.tensor(seq["labels"][a:b])


def _one_at_a_time_loss(model, seqs) -> torch.Tensor:
    """The reference: every document alone through the plain model, next-token loss within the document."""
    total = torch.zeros(())
    for ids, labels in _documents(seqs):
        logits = model(input_ids=ids[None], use_cache=False).logits[0]
        total = total + torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100,
                                                          reduction="sum")
    return total


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("micro", [2, 4])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_each_document_alone(tiny_model_dir, attn, micro):
    """fp32, 1e-5: the packed row and the documents alone add the same terms in other orders."""
    model = _model(tiny_model_dir, attn).train()
    batch, seqs = _batch(model.config.vocab_size, PACKINGS[micro], seed=micro)
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # the batch has padding
    packed, count = packed_loss(model, batch, loss_chunk_tokens=0)
    packed.backward()
    packed_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    alone = _one_at_a_time_loss(model, seqs)
    alone.backward()
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    alone_grads = _grads(model)
    assert packed_grads.keys() == alone_grads.keys()
    for name, grad in alone_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_flex_forward_equals_each_document_alone(tiny_model_dir):
    """flex_attention's forward on CPU with the document BlockMask (its backward needs CUDA: a gpu test)."""
    model = _model(tiny_model_dir, "flex_attention").eval()
    batch, seqs = _batch(model.config.vocab_size, PACKINGS[2], seed=5)
    with torch.no_grad():
        packed, _ = packed_loss(model, batch, loss_chunk_tokens=0)
        alone = _one_at_a_time_loss(_model(tiny_model_dir, "eager").eval(), seqs)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def _random_rows(rng, seq_len: int, rows: int) -> list[list[int]]:
    """Random packings: full rows (no padding), single-document rows, and many short documents."""
    out = []
    for _ in range(rows):
        kind = rng.integers(3)
        room = seq_len if kind == 0 else int(rng.integers(1, seq_len + 1))
        if kind == 1:
            out.append([room])
            continue
        lengths = []
        while room > 0:
            n = int(rng.integers(1, room + 1))
            lengths.append(n)
            room -= n
        out.append(lengths)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_collator_cu_seqlens_equal_those_from_position_ids(seed):
    rng = np.random.default_rng(seed)
    rows = _random_rows(rng, seq_len=16, rows=int(rng.integers(1, 6)))
    batch, _ = _batch(50, rows, seed=seed)
    want_cu, want_max = cu_seqlens_from_position_ids(batch["position_ids"], batch["attention_mask"])
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].device.type == "cpu"
    assert batch["cu_seqlens"].tolist() == want_cu.tolist() == [0, *np.cumsum(sum(rows, [])).tolist()]
    assert batch["max_seqlen"] == want_max == max(sum(rows, []))


def test_flattened_targets_score_exactly_the_padded_labels():
    batch, _ = _batch(50, [[3, 4], [5], [8]], seed=1)
    flat = flatten_batch(batch)
    real = int(batch["attention_mask"].sum())
    assert flat["input_ids"].shape == flat["position_ids"].shape == (1, real)
    shifted = batch["labels"][:, 1:]
    assert sorted(flat["targets"][flat["targets"] != -100].tolist()) == sorted(shifted[shifted != -100].tolist())
    ends = (torch.tensor([7, 5, 8]).cumsum(0) - 1).tolist()  # a row's last token predicts nothing
    assert flat["targets"][ends].tolist() == [-100, -100, -100]


def test_dense_reference_mask_is_block_diagonal_causal():
    mask = dense_document_mask([0, 3, 5, 6], torch.float32, "cpu")[0, 0] == 0
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_wrapped_sdpa_without_documents_is_plain_sdpa(tiny_model_dir):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = _model(tiny_model_dir, "sdpa").eval()
    packed_loss(model, _batch(model.config.vocab_size, [[3, 5]])[0], 0)  # installs the wrapper
    wrapped = ALL_ATTENTION_FUNCTIONS["sdpa"]
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(2)
    heads, kv_heads, dim = model.config.num_attention_heads, model.config.num_key_value_heads, attn.head_dim
    q = torch.randn(2, heads, 9, dim, generator=gen)
    k, v = torch.randn(2, kv_heads, 9, dim, generator=gen), torch.randn(2, kv_heads, 9, dim, generator=gen)
    got, _ = wrapped(attn, q, k, v, None, scaling=attn.scaling)
    want, _ = wrapped._zerotune_original(attn, q, k, v, None, scaling=attn.scaling)
    assert torch.equal(got, want)
    assert DOCUMENTS_KWARG == "zerotune_documents"


# --------------------------------------------------------------------------- GPU kernels


def _gpu_kernels():
    kernels = [("flex_attention", None), ("varlen", "torch.nn.attention.varlen")]
    kernels += [("flash_attention_2", "flash_attn"), ("flash_attention_3", "flash_attn_interface")]
    return kernels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attn, package", _gpu_kernels(), ids=[k for k, _ in _gpu_kernels()])
@pytest.mark.parametrize("micro", [2, 4])
def test_gpu_kernels_equal_each_document_alone(tiny_model_dir, attn, package, micro):
    """bf16 on CUDA, loss and gradients against eager one document at a time (bf16 tolerance: 2e-2
    relative on the loss, gradients by cosine similarity >= 0.999)."""
    from training.config import ModelConfig
    from training.model import load_model

    if package is not None and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed")
    torch.manual_seed(0)
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), attn_implementation=attn), "bf16",
                       {"zero_optimization": {"stage": 2}}).cuda().train()
    reference = _model(tiny_model_dir, "eager", torch.bfloat16).cuda().train()
    batch, seqs = _batch(model.config.vocab_size, PACKINGS[micro], seed=micro)
    packed, _ = packed_loss(model, batch, loss_chunk_tokens=0)
    packed.backward()
    total = torch.zeros((), device="cuda")
    for ids, labels in _documents(seqs):
        logits = reference(input_ids=ids[None].cuda(), use_cache=False).logits[0]
        total = total + torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:].cuda(),
                                                          ignore_index=-100, reduction="sum")
    total.backward()
    torch.testing.assert_close(packed.float(), total, rtol=2e-2, atol=0)
    ref = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        cos = torch.nn.functional.cosine_similarity(param.grad.float().flatten(), ref[name].grad.float().flatten(),
                                                    dim=0)
        assert cos >= 0.999, (name, float(cos))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_attention_choice_on_a_machine_without_cuda():
    from training.attention import AttentionUnavailable, choose_attention

    auto = choose_attention("auto")
    assert (auto.hf_name, auto.kernel) == ("sdpa", "sdpa") and auto.describe() == "attention: auto -> sdpa"
    assert choose_attention("eager").kernel == "eager"
    for name, why in (("varlen", "CUDA"), ("flex_attention", "backward on CPU"), ("flash_attention_2", "CUDA")):
        with pytest.raises(AttentionUnavailable) as exc:
            choose_attention(name)
        text = str(exc.value)
        assert text.startswith(f"model.attn_implementation: {name!r} cannot be used here") and why in text
        assert "use auto or one of sdpa, eager" in text
    with pytest.raises(AttentionUnavailable, match=r"'flash' is not one of auto, sdpa, eager"):
        choose_attention("flash")
