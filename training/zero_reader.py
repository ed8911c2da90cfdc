"""Read the weights of a DeepSpeed checkpoint (any ZeRO stage) one tensor at a time.

DeepSpeed's own consolidation (``zero_to_fp32``) concatenates every rank's partition of every parameter
group before slicing parameters out of it: the whole fp32 model, twice over for stages 1-2, in host RAM.
Here the partition files are memory-mapped, each parameter is copied out of the ranks' slices that hold
it, and the pages of those slices are handed back to the kernel at once, so host RAM stays at one
parameter plus the pickled metadata, whatever the model's size. At 70B that is the largest single
tensor (an embedding of 128k x 8192 fp32 = 4 GiB), against ~1 TB for the consolidated state dict.

Layouts (DeepSpeed 0.16-0.19):
- stage 0: ``mp_rank_00_model_states.pt`` holds the whole module state dict in the training precision.
- stages 1-2: rank r's ``*_optim_states.pt`` holds ``single_partition_of_fp32_groups[g]``, the r-th equal
  slice of group g's flat fp32 vector, in which the parameters lie one after another (plus alignment
  padding); ``param_shapes`` in the model states file gives their order and shapes.
- stage 3: rank r's ``fp32_flat_groups`` holds, for each parameter in order, its r-th slice of
  ceil(numel / world_size) elements (the last rank's slice is zero-padded).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4


class PartitionError(ValueError):
    """A checkpoint whose partition files cannot be read or do not fit together (names the file)."""

    user_error = True


def release_pages(view: torch.Tensor) -> None:
    """Drop the resident pages behind ``view``, a slice of a read-only memory-mapped file.

    Private file mappings re-read dropped pages from the file on the next access, so the data is intact;
    without this, every page read stays resident (and counted in RSS) until the whole file is unmapped.
    Only ever call it on tensors from ``torch.load(..., mmap=True)``: on anonymous memory it zeroes data.
    """
    if _LIBC is None or view.numel() == 0:
        return
    start = view.data_ptr()
    first_page = start - start % mmap.PAGESIZE
    length = start + view.numel() * view.element_size() - first_page
    _LIBC.madvise(ctypes.c_void_p(first_page), ctypes.c_size_t(length), _MADV_DONTNEED)


def _load_mapped(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # a truncated or overwritten file fails in many ways inside torch
        raise PartitionError(f"{path}: cannot read this checkpoint file ({type(exc).__name__}: {exc}); it is "
                             f"damaged or incomplete: export another checkpoint with --tag") from exc


@dataclass(frozen=True)
class _Location:
    """Where a parameter lives: group ``group``, elements [start, start + numel) of the full flat vector
    (stages 1-2), or of each rank's concatenated groups with ``per_rank`` elements per rank (stage 3)."""

    group: int
    start: int
    numel: int
    per_rank: int = 0


class ZeroWeights:
    """The parameters and buffers of one checkpoint folder, read one at a time with :meth:`read`.

    ``shapes`` lists them in the checkpoint's order; ``shared`` maps an alias to the parameter it shares
    storage with (tied embeddings), which is stored once and not listed in ``shapes``.
    """

    def __init__(self, tag_dir: Path, stage: int):
        self.tag_dir, self.stage = tag_dir, stage
        self.shapes: dict[str, torch.Size] = {}
        self.shared: dict[str, str] = {}
        self._direct: dict[str, torch.Tensor] = {}   # buffers, frozen and stage-0 weights: whole tensors
        self._locations: dict[str, _Location] = {}
        self._partitions: list[list[torch.Tensor]] = []  # [rank][group] flat fp32 tensors
        if stage == 0:
            self._open_stage0()
        else:
            self._open_partitioned()

    # ------------------------------------------------------------------ opening

    def _open_stage0(self) -> None:
        path = self.tag_dir / "mp_rank_00_model_states.pt"
        module = _load_mapped(path)["module"]
        self._direct = dict(module)
        self.shapes = {name: t.shape for name, t in module.items()}

    def _open_partitioned(self) -> None:
        from deepspeed.utils.zero_to_fp32 import get_model_state_files, get_optim_files

        try:
            model_files, optim_files = get_model_state_files(str(self.tag_dir)), get_optim_files(str(self.tag_dir))
        except FileNotFoundError as exc:
            raise PartitionError(f"{self.tag_dir}: {exc}; the checkpoint is incomplete") from exc
        model_states = [_load_mapped(Path(f)) for f in model_files]
        optim = [(Path(f), _load_mapped(Path(f))["optimizer_state_dict"]) for f in optim_files]
        world_size = self._check_world_size(optim)
        states = model_states[0]
        self.shared = {alias: canonical for alias, canonical in states.get("shared_params", {}).items()}
        module = states["module"]
        self._direct = {name: module[name] for name in states.get("buffer_names", []) if name in module}
        self.shapes = {name: t.shape for name, t in self._direct.items()}
        self._add_frozen(model_states)
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        self._partitions = [list(state[key]) for _, state in optim]
        self._check_partition_sizes([path for path, _ in optim])
        param_shapes = states["param_shapes"]
        if self.stage == 3:
            self._locate_zero3(param_shapes, world_size)
        else:
            self._locate_zero12(param_shapes, world_size, optim[0][1].get("param_alignment_paddings"))

    def _check_world_size(self, optim: list[tuple[Path, dict]]) -> int:
        counts = optim[0][1]["partition_count"]
        world_size = max(counts) if isinstance(counts, list) else int(counts)
        if world_size != len(optim):
            raise PartitionError(f"{self.tag_dir}: the checkpoint was written by {world_size} ranks but "
                                 f"{len(optim)} optimizer partition files are present; a rank's save is "
                                 f"missing or files from another run were copied in")
        return world_size

    def _check_partition_sizes(self, paths: list[Path]) -> None:
        expected = [t.numel() for t in self._partitions[0]]
        for path, groups in zip(paths, self._partitions):
            sizes = [t.numel() for t in groups]
            if sizes != expected:
                raise PartitionError(f"{path}: holds partitions of {sizes} elements where rank 0 holds "
                                     f"{expected}; the file is damaged or from another checkpoint")

    def _add_frozen(self, model_states: list[dict]) -> None:
        frozen = model_states[0].get("frozen_param_shapes") or {}
        for name, shape in frozen.items():
            fragments = [s["frozen_param_fragments"][name] for s in model_states]
            full = fragments[0] if self.stage < 3 else torch.cat(fragments)[:shape.numel()]
            self._direct[name] = full.view(shape)
            self.shapes[name] = torch.Size(shape)

    def _locate_zero12(self, param_shapes: list[dict], world_size: int, paddings) -> None:
        for group, shapes in enumerate(param_shapes):
            offset, group_paddings = 0, paddings[group] if paddings is not None else None
            for index, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                self._locations[name], self.shapes[name] = _Location(group, offset, numel), torch.Size(shape)
                offset += numel + (group_paddings[index] if group_paddings is not None else 0)
            available = self._partitions[0][group].numel() * world_size
            # DeepSpeed pads each group to a multiple of 2 x world_size: anything else is a mismatch.
            align = 2 * world_size
            if math.ceil(offset / align) != math.ceil(available / align):
                raise PartitionError(f"{self.tag_dir}: parameter group {group} needs {offset} elements but "
                                     f"its partitions hold {available}; a partition file is damaged or "
                                     f"from another checkpoint")

    def _locate_zero3(self, param_shapes: list[dict], world_size: int) -> None:
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                numel = math.prod(shape)
                per_rank = math.ceil(numel / world_size)
                self._locations[name] = _Location(0, offset, numel, per_rank)
                self.shapes[name] = torch.Size(shape)
                offset += per_rank
        available = sum(t.numel() for t in self._partitions[0])
        if offset != available:
            raise PartitionError(f"{self.tag_dir}: the parameters need {offset} elements per rank but each "
                                 f"partition holds {available}; a partition file is damaged or from another "
                                 f"checkpoint")

    # ------------------------------------------------------------------ reading

    def source_dtype(self, name: str) -> torch.dtype:
        """The dtype :meth:`read` returns for ``name`` (fp32 for partitioned masters)."""
        if name in self._direct:
            return self._direct[name].dtype
        return self._partitions[0][0].dtype

    def read(self, name: str) -> torch.Tensor:
        """A fresh tensor holding parameter or buffer ``name`` (its pages in the files are released)."""
        if name in self.shared:
            name = self.shared[name]
        if name in self._direct:
            source = self._direct[name]
            tensor = source.clone()
            release_pages(source)
            return tensor
        loc = self._locations[name]
        if self.stage == 3:
            flat = self._gather_zero3(loc)
        else:
            flat = self._gather_zero12(loc)
        return flat.view(self.shapes[name])

    def _gather_zero12(self, loc: _Location) -> torch.Tensor:
        out = torch.empty(loc.numel, dtype=self._partitions[0][loc.group].dtype)
        size = self._partitions[0][loc.group].numel()
        done = 0
        while done < loc.numel:
            rank, within = divmod(loc.start + done, size)
            take = min(size - within, loc.numel - done)
            piece = self._partitions[rank][loc.group].narrow(0, within, take)
            out[done:done + take].copy_(piece)
            release_pages(piece)
            done += take
        return out

    def _gather_zero3(self, loc: _Location) -> torch.Tensor:
        out = torch.empty(loc.per_rank * len(self._partitions), dtype=self._partitions[0][0].dtype)
        for rank, groups in enumerate(self._partitions):
            self._copy_rank_slice(groups, loc.start, out[rank * loc.per_rank:(rank + 1) * loc.per_rank])
        return out[:loc.numel]

    @staticmethod
    def _copy_rank_slice(groups: list[torch.Tensor], start: int, out: torch.Tensor) -> None:
        """Copy elements [start, start + len(out)) of the concatenation of ``groups`` into ``out``."""
        done, group_start = 0, 0
        for flat in groups:
            group_end = group_start + flat.numel()
            while done < out.numel() and group_start <= start + done < group_end:
                within = start + done - group_start
                take = min(group_end - (start + done), out.numel() - done)
                piece = flat.narrow(0, within, take)
                out[done:done + take].copy_(piece)
                release_pages(piece)
                done += take
            group_start = group_end
