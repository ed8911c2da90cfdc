"""Run a Hugging Face model folder with one module's weights in memory at a time.

Export verification must run the exported model on the probe batch, but loading it costs the whole model
in host RAM (140 GB at 70B in bf16). Here the model is built with its parameters on the meta device
(buffers such as rotary frequencies are computed for real), and a forward pre-hook on every module that
owns parameters loads them from the shards just before the module runs; a post-hook returns them to
the meta device. Host RAM is the largest module's weights plus the activations of the probe batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from training.shard_writer import ShardReader


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias name: canonical name} for parameters shared under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def skeleton(config, dtype: torch.dtype) -> torch.nn.Module:
    """The model ``config`` describes, parameters on the meta device (no memory), buffers computed."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Inside init_empty_weights every parameter assignment makes a new meta parameter, which unties
    # tied embeddings; tie them again outside it.
    model.tie_weights()
    return model.eval()


@contextmanager
def streamed_model(folder: Path, dtype: torch.dtype):
    """The model in ``folder``, its weights read module by module as the forward reaches them."""
    from transformers import AutoConfig

    model = skeleton(AutoConfig.from_pretrained(folder), dtype)
    reader = ShardReader(folder)
    aliases = tied_aliases(model)
    handles = []
    for module_name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own:
            prefix = f"{module_name}." if module_name else ""
            names = {n: aliases.get(prefix + n, prefix + n) for n in own}
            handles.append(module.register_forward_pre_hook(_loader(reader, names)))
            handles.append(module.register_forward_hook(_unloader(names)))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _loader(reader: ShardReader, names: dict[str, str]):
    def hook(module, _args):
        for local, stored in names.items():
            module._parameters[local] = torch.nn.Parameter(reader.get(stored), requires_grad=False)
    return hook


def _unloader(names: dict[str, str]):
    def hook(module, _args, _output):
        for local in names:
            param = module._parameters[local]
            module._parameters[local] = torch.nn.Parameter(param.to("meta"), requires_grad=False)
    return hook
