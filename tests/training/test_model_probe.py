"""training.probe: the saved logits are the module's own, and the module's mode is restored."""

from __future__ import annotations

import torch

from training.config import ModelConfig
from training.model import load_model
from training.probe import load_probe, probe_metadata, save_probe


def test_probe_round_trip_restores_training_mode(tiny_model_dir, tmp_path):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), "bf16", {})
    model.train()
    input_ids = torch.randint(5, model.config.vocab_size, (2, 9))
    path = tmp_path / "ckpt" / "probe.safetensors"
    save_probe(model, input_ids, path)

    assert model.training, "save_probe must put the module back in training mode"
    probe = load_probe(path)
    assert probe["input_ids"].dtype == torch.int64 and torch.equal(probe["input_ids"], input_ids)
    assert probe["logits"].dtype == torch.float32
    assert probe_metadata(path) == {"device_type": "cpu", "dtype": "bfloat16"}
    assert probe["logits"].shape == (2, 9, model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits.float()
    torch.testing.assert_close(probe["logits"], expected)
