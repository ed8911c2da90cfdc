"""Saving and resuming a run's checkpoints: what a checkpoint holds besides DeepSpeed's state, whether this
run may resume it, and loading it (through DeepSpeed's universal form when the world size changed).

training/checkpoint.py owns the on-disk layout (atomic folders, pointers, RNG files, the universal
conversion itself); this module decides what goes in and what may come out. Every function here is a
collective: all ranks call it at the same point.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from training import best_weights
from training import checkpoint as ckpt
from training.data import first_sequences
from training.engine import reapply_optimizer_settings
from training.sequence_parallel import check_resume_size

# Test hook: SIGKILL rank 0 in the middle of saving this step (after DeepSpeed's files, before COMPLETE).
FAULT_KILL_IN_SAVE_ENV = "ZEROTUNE_FAULT_KILL_IN_SAVE_AT_STEP"
PROBE_SEQUENCES, PROBE_TOKENS = 2, 64


@dataclass
class Progress:
    """Everything besides DeepSpeed's state needed to continue a run exactly (saved in each checkpoint)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_eval_loss: Optional[float] = None
    best_tag: Optional[str] = None
    evals_without_improvement: int = 0
    last_eval_loss: Optional[float] = None
    last_eval_step: int = -1
    stopped_early: bool = False
    best_save_pending: bool = False  # preempted between a new best evaluation and its weights save


class Checkpointer:
    """Saves full checkpoints and best weights of one rank's engine, and finds and loads the one to resume.

    ``ctx`` is the driver's RunContext (checkpoint and train sections, run identity, logger); ``batches``
    the run's TrainBatches (its global batch and how it is split, recorded for a resume on another world
    size); ``sequence_parallel_size`` is recorded too, and a resume must keep it or the global batch.
    """

    def __init__(self, engine, ctx, batches, rank: int, world_size: int, sequence_parallel_size: int = 1):
        self.engine, self.ctx, self.batches = engine, ctx, batches
        self.rank, self.world_size = rank, world_size
        self.sequence_parallel_size = sequence_parallel_size
        self.root = ckpt.checkpoint_root(ctx.output_dir)
        self.probe_ids = probe_ids(ctx.data_dir, ctx.manifest)

    # ------------------------------------------------------------------ saving

    def save(self, progress: Progress, rng_state: Optional[dict] = None) -> None:
        """Save a complete checkpoint of ``progress.step`` (a collective); ``rng_state`` (from
        ckpt.capture_rng_state) replaces the current RNG states in it."""
        started = time.perf_counter()
        tag = ckpt.tag_for_step(progress.step)
        folder = self.root / tag
        if self.rank == 0 and folder.exists() and not ckpt.is_complete(folder):
            shutil.rmtree(folder)  # left by a save that was killed; start it clean
        dist.barrier()
        state = self._state(progress)
        self.engine.save_checkpoint(str(self.root), tag=tag, client_state={"zerotune": state}, save_latest=False)
        ckpt.save_rng_state(folder / f"rng-rank{self.rank}.safetensors", rng_state)
        if self.probe_ids is not None:
            from training.probe import save_probe

            save_probe(self.engine.module, self.probe_ids, folder / "probe.safetensors")
        if self.rank == 0:
            (folder / ckpt.STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
            if os.environ.get(FAULT_KILL_IN_SAVE_ENV) == str(progress.step):
                os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()
        if self.rank == 0:
            ckpt.mark_complete(folder)
            ckpt.write_pointer(self.root, "latest", tag)
            ckpt.record_save_time(self.root, tag, time.perf_counter() - started)
            ckpt.prune(self.root, self.ctx.checkpoint.keep_last, set())
        dist.barrier()
        self.ctx.logger.line(f"step {progress.step:>6} | saved checkpoint {tag} in "
                             f"{time.perf_counter() - started:.1f} s")

    def _state(self, progress: Progress) -> dict:
        """zerotune_state.json: progress, data position, world size and what a resume must match."""
        p, batch = progress, self.batches.global_batch_size
        return {"step": p.step, "epoch": p.epoch, "data_position": {"epoch": p.epoch,
                "step_in_epoch": p.step_in_epoch}, "world_size": self.world_size,
                "config_hash": self.ctx.config_hash, "manifest_cache_key": self.ctx.manifest.get("cache_key"),
                "eval_loss": p.last_eval_loss if p.last_eval_step == p.step else None, "progress": asdict(p),
                "global_batch_size": batch, "sequences_consumed_in_epoch": p.step_in_epoch * batch,
                "optimizer_param_groups": len(self.engine.optimizer.param_groups),
                "sequence_parallel_size": self.sequence_parallel_size,
                "weight_decay": self.ctx.train.weight_decay}

    def save_best(self, progress: Progress) -> None:
        """Save the new best evaluation's weights only (a collective); full checkpoints keep their cadence."""
        p = progress
        p.best_save_pending = False
        best_weights.save_best_weights(self.engine.module, self.root, p.best_tag,
                                       {"step": p.step, "eval_loss": p.best_eval_loss}, self.probe_ids, self.rank)
        self.ctx.logger.line(f"step {p.step:>6} | saved best weights {p.best_tag}")

    # ------------------------------------------------------------------ resuming

    def resume(self) -> Optional[Progress]:
        """Load the checkpoint to resume (engine, optimizer, LR schedule, RNG) and return its progress; None
        when there is none. On another world size the checkpoint is loaded through its universal form."""
        if self.ctx.checkpoint.resume == "never":  # train.py refused a run dir holding checkpoints
            return None
        tag, notes = ckpt.find_resume_tag(self.root)
        for note in notes:
            self.ctx.logger.line(f"warning: {note}")
        if tag is None:
            return None
        state = json.loads((self.root / tag / ckpt.STATE_FILE).read_text(encoding="utf-8"))
        self._check_resumable(tag, state)
        saved_world = state["world_size"]
        load_tag = tag if saved_world == self.world_size else self._universal_tag(tag, saved_world)
        load_path, _ = self.engine.load_checkpoint(str(self.root), tag=load_tag)
        if load_path is None:
            raise ckpt.ResumeError(f"DeepSpeed could not load {self.root / load_tag}; delete that folder to "
                                   f"resume from an older checkpoint")
        reapply_optimizer_settings(self.engine.optimizer, self.engine.lr_scheduler, self.ctx.train)
        # Ranks beyond the saved ones take a saved rank's RNG state (every rank's is the same unless a loop
        # draws rank-dependent numbers).
        ckpt.load_rng_state(self.root / tag / f"rng-rank{self.rank % saved_world}.safetensors")
        progress = Progress(**state["progress"])
        self._log_resumed(tag, load_tag, saved_world, progress)
        return progress

    def _log_resumed(self, tag: str, load_tag: str, saved_world: int, p: Progress) -> None:
        if saved_world == self.world_size:
            self.ctx.logger.line(f"resumed from {tag} (step {p.step}, epoch {p.epoch})")
            return
        t = self.batches
        self.ctx.logger.line(
            f"resumed from {tag} (step {p.step}, epoch {p.epoch}) saved on "
            f"{saved_world} ranks, now {self.world_size}: loaded its universal form {load_tag} (optimizer "
            f"state, LR schedule, data position kept); global batch {t.global_batch_size} = micro "
            f"{t.micro_batch_size} x accumulation {t.accumulation} x {t.world_size} ranks")

    def _universal_tag(self, tag: str, saved_world: int) -> str:
        """Convert ``tag`` to DeepSpeed's universal form (rank 0, once; every rank learns the outcome) and
        have the engine load that form."""
        error = None
        if self.rank == 0:
            try:
                ckpt.convert_to_universal(self.root, tag, saved_world)
            except ckpt.ResumeError as exc:
                error = str(exc)
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise ckpt.ResumeError(outcome[0])
        # DeepSpeed reads its checkpoint.load_universal setting when loading, from the engine's config.
        self.engine._config.load_universal_checkpoint = True
        return ckpt.universal_folder(self.root, tag).name

    def _check_resumable(self, tag: str, state: dict) -> None:
        t = self.batches
        check_resume_size(self.root / tag, state, self.sequence_parallel_size, t.global_batch_size)
        run = RunIdentity(self.world_size, t.global_batch_size, t.micro_batch_size, t.accumulation,
                          len(self.engine.optimizer.param_groups), self.ctx.train.weight_decay,
                          self.ctx.manifest.get("cache_key"), self.ctx.config_hash)
        for warning in check_resumable(self.root / tag, state, run):
            self.ctx.logger.line(f"warning: {warning}")


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint's zerotune_state.json must agree with for this run to resume it."""

    world_size: int
    global_batch_size: int
    micro_batch_size: int
    accumulation: int
    optimizer_param_groups: int
    weight_decay: float
    manifest_cache_key: Optional[str]
    config_hash: str


def check_resumable(folder: Path, state: dict, run: RunIdentity) -> list[str]:
    """Raise ResumeError when ``run`` cannot continue the checkpoint in ``folder`` (whose saved state is
    ``state``), saying what to change; returns the warnings of a resume that may go on."""
    _check_data_position(folder, state, run)
    saved_groups = state.get("optimizer_param_groups")  # absent before it was recorded: built to match
    if saved_groups is not None and saved_groups != run.optimizer_param_groups:
        # one group saved (weight decay 0), and weight decay is set now
        raise ckpt.ResumeError(
            f"{folder} holds optimizer state for {saved_groups} parameter group (saved with "
            f"train.weight_decay {state.get('weight_decay')}) but train.weight_decay "
            f"{run.weight_decay} needs {run.optimizer_param_groups} (decay, and none for biases and norms); "
            f"resume with train.weight_decay: {state.get('weight_decay')}, or start a new output_dir")
    if state["manifest_cache_key"] != run.manifest_cache_key:
        raise ckpt.ResumeError(
            f"{folder} was trained on different prepared data (manifest cache_key changed); the "
            f"saved data position would be meaningless. Use a new output_dir, or prepare the old data again")
    warnings = []
    if _saved_before_the_global_order(state):
        warnings.append(_old_order_warning(folder, state))
    if state["config_hash"] != run.config_hash:
        warnings.append(f"the config differs from the one {folder.name} was saved with; continuing with the new one")
    return warnings


def _saved_before_the_global_order(state: dict) -> bool:
    """Checkpoints from before the global data order (training.data.epoch_order) record no position in
    sequences, only the step within the epoch of a per-rank order."""
    return "sequences_consumed_in_epoch" not in state


def _check_data_position(folder: Path, state: dict, run: RunIdentity) -> None:
    saved_world = state["world_size"]
    if saved_world == run.world_size:
        return
    if _saved_before_the_global_order(state):
        # Its position belongs to a per-rank order of unknown global batch: nothing to carry it over by.
        raise ckpt.ResumeError(
            f"{folder} was saved on {saved_world} data-parallel ranks before zerotune recorded a data position "
            f"independent of the world size (no sequences_consumed_in_epoch in {ckpt.STATE_FILE}), so it cannot "
            f"resume on {run.world_size}; resume it on {saved_world} ranks until its next checkpoint (which "
            f"records the position), or start a new output_dir")
    saved_batch = state.get("global_batch_size")
    if saved_batch != run.global_batch_size:
        # The data position counts whole global batches: another size would skip or repeat sequences.
        raise ckpt.ResumeError(
            f"{folder} was saved on {saved_world} data-parallel ranks with global batch "
            f"{saved_batch}, but this run has {run.world_size} ranks x micro "
            f"{run.micro_batch_size} x accumulation {run.accumulation} = {run.global_batch_size}; "
            f"set train.global_batch_size: {saved_batch} (micro-batch and accumulation then adapt), or "
            f"start a new output_dir")


def _old_order_warning(folder: Path, state: dict) -> str:
    position = state.get("data_position", {})
    epoch, step_in_epoch = position.get("epoch", state.get("epoch")), position.get("step_in_epoch", 0)
    if not step_in_epoch:
        return (f"{folder.name} was saved before the global data order (zerotune_state.json has no "
                f"sequences_consumed_in_epoch), at the start of epoch {epoch}: no sequence is repeated or "
                f"skipped, but the epochs from here on follow the new order, not the old one")
    return (f"{folder.name} was saved before the global data order (zerotune_state.json has no "
            f"sequences_consumed_in_epoch): the rest of epoch {epoch} (from step {step_in_epoch} of it) follows "
            f"the new order, so some of this epoch's sequences are seen twice and others not at all; from the "
            f"next epoch on every sequence is seen once. Start a new output_dir to avoid it")


def probe_ids(data_dir, manifest: dict) -> Optional[torch.Tensor]:
    """A fixed batch (the first validation sequences, else training ones) whose logits each checkpoint keeps,
    so export can verify the weights it consolidates; None without data."""
    seqs = first_sequences(data_dir, manifest, "validation", PROBE_SEQUENCES) or \
        first_sequences(data_dir, manifest, "train", PROBE_SEQUENCES)
    if not seqs:
        return None
    length = min([PROBE_TOKENS] + [len(s["input_ids"]) for s in seqs])
    return torch.tensor([list(s["input_ids"][:length]) for s in seqs], dtype=torch.long)
