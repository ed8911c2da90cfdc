"""The step never asks the device for what the host knows: no device-to-host read inside forward or backward.

On CPU every tensor is a host tensor, so the test records every call that would copy a device tensor to the
host (``.item``, ``.tolist``, ``.cpu``, ``.numpy``, ``bool``/``int``/``float`` of a tensor) while the model
runs (its forward, with the attention kernels and the chunked loss inside the LM head) and during backward.
The host-side work before the model runs (flattening the collator's batch, reading its ``cu_seqlens``) is
outside the window, as it is outside the device's stream on a GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from training.model import packed_loss
from tests.training.test_packed_attention import PACKINGS, _batch, _model

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def recorded_reads(calls: list):
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def recording(name):
        def read(self, *args, **kwargs):
            calls.append(name)
            return originals[name](self, *args, **kwargs)
        return read

    for name in READS:
        setattr(torch.Tensor, name, recording(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("attn, chunk", [("sdpa", 0), ("sdpa", 8), ("eager", 8)])
def test_no_device_to_host_read_inside_the_step(tiny_model_dir, attn, chunk):
    model = _model(tiny_model_dir, attn).train()
    batch, _ = _batch(model.config.vocab_size, PACKINGS[4], seed=4)
    calls: list[str] = []
    window = recorded_reads(calls)
    model.register_forward_pre_hook(lambda *_: [window.__enter__(), None][1])
    model.register_forward_hook(lambda *_: [window.__exit__(None, None, None), None][1])
    loss, _ = packed_loss(model, batch, chunk)
    assert calls == [], f"device reads inside the forward: {calls}"
    with recorded_reads(calls):
        loss.backward()
    assert calls == [], f"device reads inside the backward: {calls}"


def test_the_recorder_sees_a_read(tiny_model_dir):
    """The control: a forward that reads a tensor's value is caught."""
    calls: list[str] = []
    with recorded_reads(calls):
        bool(torch.ones(2).sum() > 0)
        torch.arange(3).tolist()
    assert calls == ["__bool__", "tolist"]
