"""Write safetensors shards one tensor at a time, with the index file Hugging Face loaders read.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; with transformers' default
shard size of 50 GB that is 50 GB of host RAM per shard at 70B. The format is simple enough to stream
(an 8-byte little-endian header length, a JSON header with each tensor's dtype, shape and byte range,
then the raw bytes in that order), and the header only needs names, shapes and dtypes, which are known
before any weight is read. So each file is planned first and its tensors are written as they arrive:
host RAM is one tensor. Reading back uses the official ``safetensors`` reader.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are handled: the CLI reads DEFAULT_MAX_SHARD_SIZE cheaply
    import torch

# transformers' save_pretrained default; a single tensor larger than this gets a shard of its own.
DEFAULT_MAX_SHARD_SIZE = "50GB"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPE_CODES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64",
                "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8",
                "torch.uint8": "U8", "torch.bool": "BOOL"}
_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}


def parse_size(text: str | int) -> int:
    """Bytes in ``text`` such as ``5GB``, ``500MiB`` or ``1000000`` (transformers' units: GB = 10**9)."""
    if isinstance(text, int):
        return text
    value = text.strip().upper()
    for unit, scale in _UNITS.items():
        if value.endswith(unit) and value[:-len(unit)].strip().isdigit():
            return int(value[:-len(unit)]) * scale
    if value.isdigit():
        return int(value)
    raise ValueError(f"--max-shard-size: {text!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a byte count")


@dataclass(frozen=True)
class TensorSpec:
    """What the header says of one tensor before its bytes exist."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> dict[str, list[TensorSpec]]:
    """{file name: its tensors}: tensors in order, a new file whenever the next would pass the limit."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    return {f"model-{i:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards, start=1)}


class ShardWriter:
    """One safetensors file whose header is written up front; :meth:`add` the planned tensors in order."""

    def __init__(self, path: Path, specs: list[TensorSpec]):
        self.path, self._specs, self._next = path, specs, 0
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in specs:
            header[spec.name] = {"dtype": _DTYPE_CODES[str(spec.dtype)], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(struct.pack("<Q", len(encoded)) + encoded)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor; its name, shape and dtype must be the planned ones."""
        import torch

        spec = self._specs[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
            raise ValueError(f"{self.path.name}: got {name} {tuple(tensor.shape)} {tensor.dtype}, planned "
                             f"{spec.name} {spec.shape} {spec.dtype}")
        if tensor.numel():
            self._fh.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        """Check every planned tensor arrived, then flush the file to disk."""
        if self._next != len(self._specs):
            self._fh.close()
            raise ValueError(f"{self.path.name}: {self._next} of {len(self._specs)} tensors written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()


def write_index(folder: Path, shards: dict[str, list[TensorSpec]], total_parameters: int) -> None:
    """The index transformers reads for a sharded folder (nothing for a single file)."""
    if list(shards) == [SINGLE_FILE]:
        return
    index = {"metadata": {"total_parameters": total_parameters,
                          "total_size": sum(s.nbytes for specs in shards.values() for s in specs)},
             "weight_map": {s.name: file for file, specs in shards.items() for s in specs}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def weight_map(folder: Path) -> dict[str, Path]:
    """{tensor name: the file holding it} for a folder written by this module or by save_pretrained."""
    index = folder / INDEX_FILE
    if index.is_file():
        names = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / file for name, file in names.items()}
    from safetensors import safe_open

    with safe_open(str(folder / SINGLE_FILE), framework="pt") as fh:
        return {name: folder / SINGLE_FILE for name in fh.keys()}


class ShardReader:
    """Reads tensors from a folder's shards one at a time, reopening a file after ``window_bytes`` so the
    memory map's pages read so far are let go (they would otherwise stay resident until it closes)."""

    def __init__(self, folder: Path, window_bytes: int = 64 * 2**20):
        self.files = weight_map(folder)
        self._window = window_bytes
        self._open: dict[Path, tuple[object, int]] = {}

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored."""
        return self._read(name, lambda handle: handle.get_tensor(name))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` (its first dimension), reading no other rows."""
        return self._read(name, lambda handle: handle.get_slice(name)[start:stop])

    def _read(self, name: str, read_from) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[name]
        handle, read = self._open.get(path, (None, 0))
        if handle is None or read > self._window:
            handle, read = safe_open(str(path), framework="pt"), 0
        tensor = read_from(handle)
        self._open[path] = (handle, read + tensor.numel() * tensor.element_size())
        return tensor

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: shape} from the headers, without reading any data."""
        return {name: shape for name, (shape, _) in self.headers().items()}

    def headers(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """{name: (shape, dtype code such as BF16)} from the headers, without reading any data."""
        from safetensors import safe_open

        headers = {}
        for path in sorted(set(self.files.values())):
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    piece = fh.get_slice(key)
                    headers[key] = (tuple(piece.get_shape()), piece.get_dtype())
        return headers


class FolderWeights:
    """A folder of safetensors shards read like :class:`training.zero_reader.ZeroWeights` (the best
    weights, which export reads instead of a ZeRO checkpoint)."""

    def __init__(self, folder: Path):
        import torch

        self._reader = ShardReader(folder)
        headers = self._reader.headers()
        codes = {code: getattr(torch, name.removeprefix("torch.")) for name, code in _DTYPE_CODES.items()}
        self.shapes = {name: torch.Size(shape) for name, (shape, _) in headers.items()}
        self._dtypes = {name: codes[code] for name, (_, code) in headers.items()}
        self.shared: dict[str, str] = {}

    def source_dtype(self, name: str) -> torch.dtype:
        """The dtype the tensor is stored in."""
        return self._dtypes[name]

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored."""
        return self._reader.get(name)
