"""Batch and step arithmetic: the one place that turns a config, a world size and a data size into
micro-batch, accumulation, steps per epoch and total steps.

``zerotune plan``, ``zerotune launch``, ``zerotune slurm`` and the training driver all call
:func:`plan_steps`, so the step count plan prints is the one the run takes.

The global batch size is what a user fixes (``train.global_batch_size``): on another world size the
accumulation (and if needed the micro-batch) adapts so micro x accumulation x ranks stays equal to it. The
global order (training.data) then hands every step the same sequences on any world size.

Ranks count here as data-parallel ranks: with ``train.sequence_parallel_size`` N, the N ranks of a
sequence-parallel group share one micro-batch (training.sequence_parallel), so a world of W ranks is
W / N data-parallel ranks (:func:`data_parallel_size`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


class BatchError(ValueError):
    """A global batch size that the world size cannot split (says the arithmetic and what would work)."""

    user_error = True


@dataclass(frozen=True)
class StepPlan:
    """The resolved batch arithmetic of a run."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int  # data-parallel ranks (the world divided by train.sequence_parallel_size)
    train_sequences: int
    steps_per_epoch: int
    total_steps: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size


def data_parallel_size(world_size: int, sequence_parallel_size: int = 1) -> int:
    """Data-parallel ranks of a world: each sequence-parallel group of ``sequence_parallel_size`` consecutive
    ranks reads one data-parallel rank's micro-batches. Raises BatchError when the groups do not tile it."""
    if sequence_parallel_size < 1 or world_size % sequence_parallel_size:
        raise BatchError(f"train.sequence_parallel_size {sequence_parallel_size} does not divide the world size "
                         f"{world_size}; use a divisor of {world_size}")
    return world_size // sequence_parallel_size


def resolve_batch(micro_batch_size: int, accumulation: int, global_batch_size: Optional[int],
                  world_size: int) -> tuple[int, int]:
    """(micro, accumulation) for ``world_size``: as configured without a global batch size; with one, the
    largest micro-batch up to the configured one that divides ``global_batch_size / world_size``, and the
    accumulation that makes up the rest. Raises BatchError when the ranks cannot share it equally."""
    if global_batch_size is None:
        return micro_batch_size, accumulation
    per_rank, extra = divmod(global_batch_size, world_size)
    if extra or per_rank < 1:
        lower = global_batch_size - extra
        nearest = [g for g in (lower, lower + world_size) if g >= world_size]
        sizes = [w for w in range(1, 2 * world_size + 1) if global_batch_size % w == 0]
        raise BatchError(
            f"train.global_batch_size {global_batch_size} cannot be split over {world_size} data-parallel "
            f"ranks ({global_batch_size} / {world_size} = {global_batch_size / world_size:g} sequences per "
            f"rank, not a whole number); use train.global_batch_size {' or '.join(map(str, nearest))}, or run "
            f"on a world size that divides it ({', '.join(map(str, sizes))})")
    micro = max(m for m in range(1, min(micro_batch_size, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def resolved_train(train, world_size: int):
    """``train`` (a TrainConfig) with micro-batch and accumulation resolved for ``world_size`` ranks."""
    data_parallel = data_parallel_size(world_size, train.sequence_parallel_size)
    micro, accum = resolve_batch(train.micro_batch_size, train.gradient_accumulation_steps,
                                 train.global_batch_size, data_parallel)
    return dataclasses.replace(train, micro_batch_size=micro, gradient_accumulation_steps=accum,
                               global_batch_size=micro * accum * data_parallel)


def plan_steps(train, train_sequences: int, world_size: int) -> StepPlan:
    """Steps per epoch (whole global batches of the training split; the remainder is dropped each epoch)
    and total steps (``train.max_steps``, or epochs x steps per epoch) for ``train`` on ``world_size``
    ranks (the plan's ``world_size`` is their data-parallel count)."""
    data_parallel = data_parallel_size(world_size, train.sequence_parallel_size)
    micro, accum = resolve_batch(train.micro_batch_size, train.gradient_accumulation_steps,
                                 train.global_batch_size, data_parallel)
    per_epoch = train_sequences // (micro * accum * data_parallel)
    total = train.max_steps if train.max_steps is not None else train.epochs * per_epoch
    return StepPlan(micro, accum, data_parallel, train_sequences, per_epoch, total)


def train_sequences(manifest: dict) -> int:
    """Training sequences in a prepared data set's manifest."""
    return sum(int(s["sequences"]) for s in manifest["splits"].get("train", {}).get("shards", []))
