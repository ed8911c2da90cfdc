"""A probe: a fixed batch and the logits the trained weights give on it, saved beside each checkpoint.

Export recomputes the logits from the consolidated weights and compares, which catches a wrong
consolidation (a shuffled shard, a missed tied weight) that a parameter count alone would not.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def save_probe(module: torch.nn.Module, input_ids: torch.Tensor, path: str | Path) -> None:
    """Run ``module`` in eval mode without gradients on ``input_ids`` [B, T]; rank 0 writes the probe.

    Call it on every rank: under ZeRO-3 each forward gathers parameters from all ranks. The module's
    train/eval mode is restored afterwards. The file holds ``input_ids`` (int64) and ``logits`` (float32).
    """
    from safetensors.torch import save_file

    hf_model = getattr(module, "module", module)
    was_training = module.training
    module.eval()
    try:
        # The engine's compute device, not the first parameter's: with ZeRO-3 parameter offload the
        # parameters live on the CPU while the forward runs on the accelerator.
        device = getattr(module, "device", None)
        device = torch.device(device) if device is not None else next(hf_model.parameters()).device
        with torch.no_grad():
            logits = module(input_ids=input_ids.to(device), use_cache=False).logits
    finally:
        module.train(was_training)
    if _rank() == 0:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        # Where and in what precision the logits were computed: export tolerates kernel rounding only
        # when it recomputes them elsewhere.
        metadata = {"device_type": device.type, "dtype": str(logits.dtype).removeprefix("torch.")}
        save_file({"input_ids": input_ids.detach().to("cpu", torch.int64).contiguous(),
                   "logits": logits.detach().to("cpu", torch.float32).contiguous()}, str(tmp), metadata=metadata)
        tmp.replace(path)


def load_probe(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a probe written by :func:`save_probe`: ``{"input_ids": [B, T] int64, "logits": [B, T, V] float32}``."""
    from safetensors.torch import load_file

    return load_file(str(path))


def probe_metadata(path: str | Path) -> dict[str, str]:
    """The probe's ``device_type`` (cpu, cuda, ...) and compute ``dtype`` (float32, bfloat16, ...)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})
