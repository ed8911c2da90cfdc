"""The best validation weights, saved as weights only, and loaded back for the test split.

A full ZeRO checkpoint (fp32 masters, Adam moments, every rank's files) is ~16 bytes per parameter, ~1 TB
at 70B, and it used to be written on every validation improvement. The best weights need only the
module's weights in the training precision (2 bytes per parameter in bf16: 140 GB at 70B), written as
safetensors shards that ``zerotune export --tag best`` and the test-split evaluation read directly.

Saving is a collective: under ZeRO-3 each parameter is gathered in turn (one all-gather per parameter, so
a rank holds one whole parameter at a time) and rank 0 appends it to the shard it is writing; under
stages 0-2 every rank holds the module's weights already. Layout, beside the full checkpoints::

    checkpoints/best-weights/<tag>/  model*.safetensors (+ index), probe.safetensors, best.json, COMPLETE
    checkpoints/best                 text: <tag>, replaced only after that folder is complete

The folder is written under a temporary name, flushed and marked (checkpoint.mark_complete), renamed, and
only then does ``best`` point at it; older best-weights folders are deleted last.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from training import checkpoint as ckpt
from training.shard_writer import DEFAULT_MAX_SHARD_SIZE, ShardReader, ShardWriter, TensorSpec, parse_size, \
    plan_shards, write_index
from training.streamed_model import tied_aliases

BEST_DIR = "best-weights"
INFO_FILE = "best.json"


def best_folder(root: Path, tag: str) -> Path:
    """Where the best weights of ``tag`` live under the checkpoints folder ``root``."""
    return root / BEST_DIR / tag


def complete_best(root: Path) -> Path | None:
    """The folder ``best`` points at, when it is a complete best-weights folder."""
    tag = (root / "best").read_text(encoding="utf-8").strip() if (root / "best").is_file() else ""
    folder = best_folder(root, tag) if tag else None
    return folder if folder is not None and (folder / ckpt.COMPLETE_MARKER).is_file() else None


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: parameter or persistent buffer} as the state dict names them, tied aliases left out."""
    aliases = tied_aliases(module)
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers())
    return {name: params.get(name, buffers.get(name)) for name in module.state_dict(keep_vars=True)
            if name not in aliases}


def _full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def _gathered(tensor: torch.Tensor, modifier_rank=None):
    """Context in which a ZeRO-3 partitioned ``tensor`` is whole on every rank (others: as it is)."""
    if not hasattr(tensor, "ds_id"):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([tensor], modifier_rank=modifier_rank)


def save_best_weights(module: torch.nn.Module, root: Path, tag: str, info: dict, probe_ids: torch.Tensor | None,
                      rank: int, max_shard_size: str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write ``module``'s weights as checkpoint ``tag``'s best weights and point ``best`` at them; call on
    every rank (a collective). ``info`` (step, eval loss, ...) goes to best.json."""
    import torch.distributed as dist

    tensors = _tensors(module)
    final = best_folder(root, tag)
    tmp = final.with_name(f".tmp-{tag}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    specs = [TensorSpec(name, _full_shape(t), t.dtype) for name, t in tensors.items()]
    shards = plan_shards(specs, parse_size(max_shard_size))
    for file, file_specs in shards.items():
        writer = ShardWriter(tmp / file, file_specs) if rank == 0 else None
        for spec in file_specs:
            with _gathered(tensors[spec.name]):
                if writer is not None:
                    writer.add(spec.name, tensors[spec.name].detach().to("cpu"))
        if writer is not None:
            writer.close()
    if probe_ids is not None:
        from training.probe import save_probe

        save_probe(module, probe_ids, tmp / "probe.safetensors")
    if rank == 0:
        params = dict(module.named_parameters())
        write_index(tmp, shards, sum(spec.nbytes // spec.dtype.itemsize for spec in specs if spec.name in params))
        (tmp / INFO_FILE).write_text(json.dumps({"tag": tag, **info}, indent=2), encoding="utf-8")
        _publish(root, tmp, final, tag)
    dist.barrier()
    return final


def _publish(root: Path, tmp: Path, final: Path, tag: str) -> None:
    ckpt.mark_complete(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    ckpt.fsync_path(final.parent)
    ckpt.write_pointer(root, "best", tag)
    for old in final.parent.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def load_best_weights(module: torch.nn.Module, folder: Path, rank: int) -> None:
    """Copy the weights in ``folder`` into ``module`` on every rank (a collective; no optimizer state is
    read or changed, so use it only once training is over)."""
    tensors = _tensors(module)
    reader = ShardReader(folder)
    missing = sorted(set(tensors) - set(reader.files))
    if missing:
        raise ValueError(f"{folder}: no weights for {missing[:5]}; it was saved from another model")
    for name, target in tensors.items():
        zero3 = hasattr(target, "ds_id")
        with _gathered(target, modifier_rank=0), torch.no_grad():
            if rank == 0 or not zero3:
                target.data.copy_(reader.get(name))
