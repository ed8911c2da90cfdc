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


class _Offloaded(torch.nn.Module):
    """Stands in for a ZeRO-3 offloaded model: its first parameter lives off the compute device."""

    def __init__(self, model):
        super().__init__()
        self.placeholder = torch.nn.Parameter(torch.empty(0, device="meta"))
        self.inner = model

    def forward(self, **kwargs):
        return self.inner(**kwargs)


class _Engine(torch.nn.Module):
    """Like a DeepSpeed engine: wraps the model as ``.module`` and says where it computes in ``.device``."""

    def __init__(self, model):
        super().__init__()
        self.module = model
        self.device = torch.device("cpu")

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_probe_runs_on_the_engines_compute_device_not_the_first_parameters(tiny_model_dir, tmp_path):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), "fp32", {})
    engine = _Engine(_Offloaded(model))
    assert next(engine.module.parameters()).device.type == "meta"
    input_ids = torch.randint(5, model.config.vocab_size, (1, 6))
    save_probe(engine, input_ids, tmp_path / "probe.safetensors")
    assert probe_metadata(tmp_path / "probe.safetensors")["device_type"] == "cpu"
    with torch.no_grad():
        expected = model.eval()(input_ids=input_ids).logits
    torch.testing.assert_close(load_probe(tmp_path / "probe.safetensors")["logits"], expected)
