"""Streamed safetensors shards, the partition reader's page release, and the module-by-module model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from training.shard_writer import (INDEX_FILE, SINGLE_FILE, ShardReader, ShardWriter, TensorSpec, parse_size,
                                   plan_shards, write_index)
from training.streamed_model import streamed_model
from training.zero_reader import release_pages


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(30, 7, generator=gen).to(torch.bfloat16),
            "b.weight": torch.randn(100, generator=gen),
            "c.bias": torch.randn(3, 5, generator=gen).to(torch.float16),
            "d.index": torch.arange(6, dtype=torch.int64).view(2, 3),
            "e.scalar": torch.tensor(2.5)}


def _write(folder, tensors, max_bytes):
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    shards = plan_shards(specs, max_bytes)
    for file, file_specs in shards.items():
        writer = ShardWriter(folder / file, file_specs)
        for spec in file_specs:
            writer.add(spec.name, tensors[spec.name])
        writer.close()
    write_index(folder, shards, total_parameters=123)
    return shards


def test_parse_size_follows_transformers_units():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500mb") == 500 * 10**6 and parse_size("1000") == 1000 and parse_size(7) == 7
    with pytest.raises(ValueError, match="--max-shard-size: 'lots' is not a size"):
        parse_size("lots")


def test_one_file_reads_back_with_the_official_reader(tmp_path):
    tensors = _tensors()
    shards = _write(tmp_path, tensors, max_bytes=10**9)
    assert list(shards) == [SINGLE_FILE] and not (tmp_path / INDEX_FILE).exists()
    loaded = load_file(str(tmp_path / SINGLE_FILE))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(tmp_path / SINGLE_FILE), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}


def test_shard_limit_splits_files_and_indexes_them(tmp_path):
    tensors = _tensors()
    shards = _write(tmp_path, tensors, max_bytes=450)  # a.weight (420 B) and b.weight (400 B) cannot share
    assert len(shards) >= 3 and all(f.startswith("model-") for f in shards)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"] == {"total_parameters": 123,
                                 "total_size": sum(t.numel() * t.element_size() for t in tensors.values())}
    assert index["weight_map"].keys() == tensors.keys()
    for name, file in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / file))[name], tensors[name])
        assert name in [s.name for s in shards[file]]
    reader = ShardReader(tmp_path, window_bytes=1)  # reopens the file on every read
    assert all(torch.equal(reader.get(n), t) for n, t in tensors.items())
    assert reader.shapes() == {n: tuple(t.shape) for n, t in tensors.items()}


def test_writer_refuses_tensors_out_of_plan(tmp_path):
    spec = TensorSpec("x", (2, 2), torch.float32)
    writer = ShardWriter(tmp_path / "x.safetensors", [spec])
    with pytest.raises(ValueError, match=r"got x \(2, 3\)"):
        writer.add("x", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="0 of 1 tensors written"):
        writer.close()


def test_released_pages_of_a_mapped_file_read_back_intact(tmp_path):
    original = torch.randn(3 * 4096 + 17)
    torch.save({"w": original}, tmp_path / "w.pt")
    mapped = torch.load(tmp_path / "w.pt", mmap=True, weights_only=True)["w"]
    first = mapped[100:9000].clone()
    release_pages(mapped[100:9000])
    assert torch.equal(mapped, original) and torch.equal(first, original[100:9000])


def test_streamed_model_gives_the_loaded_models_logits(tiny_model_dir):
    """One module's weights at a time vs the whole model loaded: the same fp32 arithmetic."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(5, 500, (2, 11), generator=torch.Generator().manual_seed(3))
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = full(input_ids=ids).logits
        with streamed_model(tiny_model_dir, torch.float32) as model:
            got = model(input_ids=ids).logits
            assert all(p.device.type == "meta" for p in model.parameters()), "weights left in memory"
    assert torch.equal(got, expected)
