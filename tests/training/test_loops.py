"""The loop registry and the shipped loops' labels."""

from __future__ import annotations

import sys

import pytest
import torch

from training.loops import Loop, LoopError, PretrainLoop, SFTLoop, get_loop, registered_loops


def test_registered_names_and_unknown_name_lists_them():
    assert {"sft", "pretrain"} <= set(registered_loops())
    assert get_loop("sft") is SFTLoop and get_loop("pretrain") is PretrainLoop
    with pytest.raises(LoopError) as exc:
        get_loop("stf")
    assert "pretrain" in str(exc.value) and "sft" in str(exc.value)
    assert LoopError.user_error is True


def test_loop_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_loops.py").write_text(
        "from training.loops import SFTLoop\nclass Mine(SFTLoop):\n    pass\nclass NotALoop:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = get_loop("my_loops:Mine")
    assert issubclass(cls, Loop) and cls.__name__ == "Mine"
    with pytest.raises(LoopError, match="not a subclass"):
        get_loop("my_loops:NotALoop")
    with pytest.raises(LoopError, match="cannot import"):
        get_loop("no_such_module_xyz:Mine")
    sys.modules.pop("my_loops", None)


def test_pretrain_labels_every_real_token_but_document_starts_and_padding():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 0]]), "labels": torch.full((1, 6), -100),
             "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])}
    out = PretrainLoop().prepare_batch(batch)
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9, -100]]
    assert PretrainLoop().count_tokens(out) == 3  # labels[:, 1:] scored: 6, 7, 9
    assert SFTLoop().count_tokens(batch) == 0


def test_sft_loss_matches_mean_cross_entropy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[3, 10, 11, 12, 13, 14]])
    labels = torch.tensor([[-100, -100, 11, 12, 13, 14]])
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(6)[None],
             "attention_mask": torch.ones_like(ids)}
    loss_sum, count = SFTLoop().compute_loss(model, batch)
    assert int(count) == 4
    reference = model(input_ids=ids, labels=labels).loss  # HF mean over scored tokens
    assert torch.allclose(loss_sum / count, reference, atol=1e-5)
