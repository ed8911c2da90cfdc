"""One rank of the ZeRO-3 loading comparison (run by test_zero3_load.py through the deepspeed launcher).

For each case it loads the model twice with ``training.model.load_model`` under ZeRO-3: once as it
loads today and once through transformers' ``from_pretrained`` (the streaming loader switched off), gathers
both and writes what differs, which loader ran, how many checkpoint elements this rank read, and the
losses of a few training steps from each.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import deepspeed
import safetensors
import torch
import transformers.modeling_utils

import training.model
from training.config import ModelConfig
from training.model import load_model

TRAIN_STEPS = 3


class CountingOpen:
    """``safetensors.safe_open`` that counts the elements of every tensor read through it."""

    read_elements = 0

    def __init__(self, *args, **kwargs):
        self._inner = _SAFE_OPEN(*args, **kwargs)

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def get_tensor(self, name):
        return _counted(self._inner.get_tensor(name))

    def get_slice(self, name):
        return CountingSlice(self._inner.get_slice(name))


class CountingSlice:
    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __getitem__(self, index):
        return _counted(self._inner[index])


def _counted(tensor: torch.Tensor) -> torch.Tensor:
    CountingOpen.read_elements += tensor.numel()
    return tensor


_SAFE_OPEN = safetensors.safe_open
safetensors.safe_open = CountingOpen
transformers.modeling_utils.safe_open = CountingOpen


def ds_config(precision: str) -> dict:
    world = torch.distributed.get_world_size()
    cfg = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1,
           "gradient_accumulation_steps": 1, "train_batch_size": world,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def load(folder: str, precision: str, streaming: bool):
    """(model, whether the streaming loader produced it, checkpoint elements this rank read)."""
    original = training.model._load_zero3_streaming
    ran = []

    def recorded(*args):
        model = original(*args) if streaming else None
        ran.append(model is not None)
        return model

    training.model._load_zero3_streaming = recorded
    CountingOpen.read_elements = 0
    try:
        model = load_model(ModelConfig(name_or_path=folder), precision, ds_config(precision))
    finally:
        training.model._load_zero3_streaming = original
    return model, ran == [True], CountingOpen.read_elements


def gathered(model) -> dict[str, torch.Tensor]:
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        out = {f"param {n}": p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    out.update({f"buffer {n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def train_losses(model, precision: str) -> list[float]:
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(precision))
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1 + torch.distributed.get_rank())
    losses = []
    for _ in range(TRAIN_STEPS):
        ids = torch.randint(0, vocab, (1, 16), generator=generator)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.destroy()
    return losses


def describe(model) -> dict:
    return {"training": model.training, "config": model.config.to_diff_dict(),
            "generation": model.generation_config.to_diff_dict() if model.generation_config else None,
            "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight}


def run_case(case: dict) -> dict:
    results = {}
    for streaming in (True, False):
        model, streamed, read = load(case["folder"], case["precision"], streaming)
        results[streaming] = {"tensors": gathered(model), "streamed": streamed, "read_elements": read,
                              "describe": describe(model),
                              "total_elements": sum(p.ds_numel for p in model.parameters())}
        results[streaming]["losses"] = train_losses(model, case["precision"]) if case.get("train") else None
        del model
        gc.collect()
    new, old = results[True], results[False]
    differ = sorted(k for k in old["tensors"] if k not in new["tensors"]
                    or old["tensors"][k].dtype != new["tensors"][k].dtype
                    or not torch.equal(old["tensors"][k], new["tensors"][k]))
    return {"name": case["name"], "differ": differ, "names": sorted(new["tensors"]) == sorted(old["tensors"]),
            "streamed": new["streamed"], "read_elements": new["read_elements"],
            "transformers_read_elements": old["read_elements"], "total_elements": new["total_elements"],
            "describe_equal": new["describe"] == old["describe"], "tied": new["describe"]["tied"],
            "losses": new["losses"], "transformers_losses": old["losses"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = p.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    out = [run_case(case) for case in json.loads(args.cases.read_text())]
    (args.out / f"rank{rank}.json").write_text(json.dumps(out, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
