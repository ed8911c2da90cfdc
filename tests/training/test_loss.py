"""The chunked loss equals the plain one (loss and gradients), and never builds the full logits."""

from __future__ import annotations

import pytest
import torch

from training.loss import ChunkedCrossEntropy, LossChunkError, check_chunkable, cross_entropy_sum
from training.model import packed_loss
from tests.training.test_packed_attention import PACKINGS, _batch, _model


def _assert_relative(got, want, tol=1e-6, what=""):
    """Relative error of the whole tensor (norm of the difference over the norm): per element, fp32 sums in
    another order differ by an ulp or two of the largest terms, which is large relative to tiny elements."""
    error = float((got - want).norm() / want.norm()) if want.norm() > 0 else float(got.norm())
    assert error <= tol, f"{what}: relative error {error:.2e} > {tol:g}"


def _plain_and_chunked(hidden, weight, targets, chunk):
    out = []
    for fn in (lambda h, w: cross_entropy_sum(torch.nn.functional.linear(h, w), targets),
               lambda h, w: ChunkedCrossEntropy.apply(h, w, targets, chunk)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w)
        (loss * 0.37).backward()  # a non-unit upstream gradient, as the driver's scale is
        out.append((loss.detach(), h.grad, w.grad))
    return out


@pytest.mark.parametrize("chunk", [1, 4, 5, 20, 64])
def test_chunked_function_equals_plain_with_ignored_labels_at_chunk_edges(chunk):
    """fp32, 1e-6 relative: the same sums, grouped by chunk."""
    gen = torch.Generator().manual_seed(chunk)
    hidden, weight = torch.randn(20, 16, generator=gen), torch.randn(50, 16, generator=gen)
    targets = torch.randint(0, 50, (20,), generator=gen)
    targets[[0, 3, 4, 5, 9, 10, 19]] = -100  # chunk starts and ends for chunk 4 and 5, and the last token
    (plain, ph, pw), (chunked, ch, cw) = _plain_and_chunked(hidden, weight, targets, chunk)
    _assert_relative(chunked, plain, what="loss")
    _assert_relative(ch, ph, what="hidden gradient")
    _assert_relative(cw, pw, what="weight gradient")
    # an unscored token's hidden state gets no gradient (its prediction is not in the loss)
    assert torch.equal(ch[targets == -100], torch.zeros_like(ch[targets == -100]))


@pytest.mark.parametrize("chunk", [7, 16, 3000])
def test_packed_chunked_loss_and_gradients_equal_plain(tiny_model_dir, chunk):
    """Through the whole model, micro 4 with padding; fp32, 1e-6 relative (per tensor, as above)."""
    model = _model(tiny_model_dir, "sdpa").train()
    batch, _ = _batch(model.config.vocab_size, PACKINGS[4], seed=9)
    results = []
    for tokens in (0, chunk):
        model.zero_grad(set_to_none=True)
        loss, count = packed_loss(model, batch, tokens)
        loss.backward()
        results.append((loss.detach(), int(count), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_count, plain_grads), (chunked, chunked_count, chunked_grads) = results
    assert plain_count == chunked_count
    _assert_relative(chunked, plain, what="loss")
    for name, grad in plain_grads.items():
        _assert_relative(chunked_grads[name], grad, what=name)


def test_chunked_loss_never_holds_the_full_logits(tiny_model_dir):
    """No tensor with as many elements as N x V is created while the chunked loss runs (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = _model(tiny_model_dir, "sdpa").train()
    batch, _ = _batch(model.config.vocab_size, PACKINGS[4], seed=3)
    tokens = int(batch["attention_mask"].sum())
    full = tokens * model.config.vocab_size
    largest = []

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    largest.append(t.numel())
            return out

    for chunk, expect_full in ((8, False), (0, True)):
        largest.clear()
        with Largest():
            loss, _ = packed_loss(model, batch, chunk)
            loss.backward()
        assert (max(largest) >= full) == expect_full, (chunk, max(largest), full)


def test_models_that_transform_logits_are_refused(tiny_model_dir):
    model = _model(tiny_model_dir, "sdpa")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(LossChunkError, match=r"train\.loss_chunk_tokens.*final_logit_softcapping.*0"):
        check_chunkable(model)
