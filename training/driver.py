"""The step loop: accumulation, loss normalisation, evaluation, early stopping, checkpoints, logging, resume.

A loop (training/loops.py) only turns a batch into ``(loss_sum, token_count)``. This driver fetches all
micro-batches of an optimizer step first, all-reduces their supervised-token count, and back-propagates
each micro loss as ``loss_sum * world_size / global_count``: DeepSpeed averages gradients over ranks (the
``world_size`` cancels it) and is told not to divide by the accumulation steps (``scale_wrt_gas=False``).
So the gradient is the mean over every supervised token of the step, however it is split into micro-batches
and ranks.

One small all-reduce per step carries everything the ranks must agree on: this step's token counts, the
preemption flag, and the previous step's loss sum and loss/count check. A step's loss is therefore summed
over ranks (and its train/ scalars written) when the next step starts, or before an evaluation, a checkpoint
or the end, whichever comes first. On a GPU the step syncs with the host once, there.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from training import best_weights
from training import checkpoint as ckpt
from training.config import CheckpointConfig, EvalConfig, TrainConfig
from training.data import Collator, RankSequences, TrainBatches, eval_batches, first_sequences
from training.engine import reapply_optimizer_settings
from training.preemption import PREEMPTED_EXIT_CODE, PreemptionFlag
from training.sequence_parallel import check_resume_size, local_supervised_tokens, placement
from training.tb import (MetricsLogger, memory_gb, peak_flops_per_device, perplexity, squared_document_tokens,
                         training_flops)

# Test hook: SIGKILL rank 0 in the middle of saving this step (after DeepSpeed's files, before COMPLETE).
FAULT_KILL_IN_SAVE_ENV = "ZEROTUNE_FAULT_KILL_IN_SAVE_AT_STEP"
PROBE_SEQUENCES, PROBE_TOKENS = 2, 64


class LossCountMismatch(RuntimeError):
    """A loop whose compute_loss scored a different number of tokens than its count_tokens promised.

    Found from the summed check, so every rank raises it at the same step boundary and stops cleanly.
    """

    user_error = True


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


class _Preempted(Exception):
    """The ranks agreed to stop; ``rng_state`` is what the checkpoint must hold for an exact resume."""

    def __init__(self, rng_state: dict):
        super().__init__("preempted")
        self.rng_state = rng_state


@dataclass
class RunContext:
    """What the driver needs besides the engine and loop: config sections and run identity."""

    train: TrainConfig
    eval: EvalConfig
    checkpoint: CheckpointConfig
    output_dir: Path
    data_dir: Path
    manifest: dict
    config_hash: str
    zero_stage: int
    tokenizer: object
    logger: MetricsLogger
    model_shape: dict
    log_every_steps: int = 1
    heartbeat: object = None  # a training.heartbeat.Heartbeat, told each phase change (None: no heartbeats)


class Driver:
    """Runs training to the end, early stop or preemption; ``run()`` returns the process exit code."""

    def __init__(self, engine, loop, ctx: RunContext, total_steps: int):
        self.engine, self.loop, self.ctx = engine, loop, ctx
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = engine.device  # the compute device (parameters may be offloaded to the CPU)
        self.sp = placement(engine.module)  # a sequence-parallel group reads one data-parallel rank's batches
        t, e = ctx.train, ctx.eval
        pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
        pad_to = ctx.manifest["seq_len"] if t.pad_to == "seq_len" else None
        self.collator = Collator(pad_id, pad_to)
        # Every rank opens the whole training split: the order is global, each step deals out its share.
        self.train_data = TrainBatches(
            RankSequences.open(ctx.data_dir, ctx.manifest, "train", rank=0, world_size=1), self.collator,
            t.micro_batch_size, t.gradient_accumulation_steps, self.sp.dp_size, self.sp.dp_rank, t.seed)
        self.eval_micro = e.micro_batch_size or t.micro_batch_size
        self.total_steps = total_steps
        self.progress = Progress()
        self.root = ckpt.checkpoint_root(ctx.output_dir)
        self.preempt = PreemptionFlag()
        self.probe_ids = self._probe_ids()
        self._saved_step = -1
        self._pending: Optional[_PendingStep] = None

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        """Train; returns 0, or PREEMPTED_EXIT_CODE after saving on a signal."""
        self.preempt.install()
        self._maybe_resume()
        self.engine.train()
        try:
            self._finish_interrupted_work()
            while self.progress.step < self.total_steps and not self.progress.stopped_early:
                self._step()
            self._finish()
        except _Preempted as stop:
            return self._stop_preempted(stop.rng_state)
        self.preempt.uninstall()
        return 0

    def _step(self) -> None:
        """One optimizer step: fetch, agree on counts and preemption, train, then evaluate/save when due."""
        t0 = time.perf_counter()
        self._beat("data")
        # A loop's prepare_batch may draw random numbers: a preemption save must hold the RNG states
        # from before it, or the resumed step would draw differently.
        rng_before_step = ckpt.capture_rng_state()
        batches = [self.loop.prepare_batch(b) for b in
                   self.train_data.step_batches(self.progress.epoch, self.progress.step_in_epoch)]
        data_wait = time.perf_counter() - t0
        counts = [self.loop.count_tokens(b) for b in batches] if not self.sp.active else \
            [local_supervised_tokens(b, self.sp.size, self.sp.rank) for b in batches]  # this rank's slices
        real = sum(int(b["attention_mask"].sum()) for b in batches) / self.sp.size
        flops = sum(self._useful_flops(b) for b in batches) / self.sp.size
        global_count, global_real, global_flops, preempted = self._reduce_step_start(
            float(sum(counts)), float(real), flops)
        if preempted:
            raise _Preempted(rng_before_step)
        self._train_step(batches, counts, global_count, (global_real, global_flops), t0, data_wait)
        self._after_step()

    def _stop_preempted(self, rng_state: dict) -> int:
        """Save the current step (unless saved) with ``rng_state`` and return PREEMPTED_EXIT_CODE."""
        # From here on further signals are ignored, also during interpreter shutdown (which would
        # restore the default, deadly action for a Python handler).
        self.preempt.ignore_further()
        if self._saved_step != self.progress.step:
            self._save(rng_state=rng_state)
        self.ctx.logger.line(f"preempted at step {self.progress.step}: checkpoint saved, "
                             f"exiting {PREEMPTED_EXIT_CODE}")
        return PREEMPTED_EXIT_CODE

    def _any_rank_preempted(self) -> bool:
        """Whether any rank got a preemption signal (a collective: every rank must ask at the same point)."""
        return self._all_sum([1.0 if self.preempt.requested else 0.0])[0] > 0

    def _finish_interrupted_work(self) -> None:
        """After a resume: the evaluation a preemption cut short, and the best-weights save it put off."""
        p, e = self.progress, self.ctx.eval
        if p.step and p.last_eval_step != p.step and e.every_steps and p.step % e.every_steps == 0 \
                and p.step < self.total_steps:
            self._evaluate_and_track(ckpt.capture_rng_state())
            if p.stopped_early and self._saved_step != p.step:
                self._save()
        if p.best_save_pending:
            self._save_best()

    def _train_step(self, batches: list[dict], counts: list[int], global_count: float,
                    global_work: tuple[float, float], t0: float, data_wait: float) -> None:
        """Forward, backward and step over the step's micro-batches; leaves the loss pending (see _settle)."""
        scale = self.world_size / max(global_count, 1.0)
        lr = self.engine.get_lr()[0]
        logs = self._logs_step(self.progress.step + 1)
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        miscount = torch.zeros((), dtype=torch.float64, device=self.device)
        stage0_norm = None
        for k, (batch, count) in enumerate(zip(batches, counts)):
            self._beat("forward", k)
            loss_sum, scored = self.loop.compute_loss(self.engine, batch)
            # Checked when the sums come back, on every rank at once; no host sync per micro-batch.
            miscount += (torch.as_tensor(scored, device=self.device).double().sum() - count).abs()
            self._beat("backward", k)
            self.engine.backward(loss_sum * scale, scale_wrt_gas=False)
            if k == len(batches) - 1 and logs:
                stage0_norm = self._stage0_grad_norm()
            self._beat("step", k)
            self.engine.step()
            loss_total += loss_sum.detach().double()
        self._advance_position()
        step_time = time.perf_counter() - t0
        self._pending = _PendingStep(
            step=self.progress.step, loss_sum=loss_total, miscount=miscount, global_count=global_count,
            global_real=global_work[0], global_flops=global_work[1], lr=lr, step_time=step_time,
            data_wait=data_wait, logs=logs, grad_norm=_grad_norm_value(self.engine, stage0_norm) if logs else None)

    def _reduce_step_start(self, count: float, real: float, flops: float) -> tuple[float, float, float, bool]:
        """The step's one collective: sums this step's counts and the preemption flag over ranks, and the
        previous step's pending loss (which it then settles)."""
        pending = self._pending
        flag = 1.0 if self.preempt.requested else 0.0
        if pending:
            sums = self._all_sum([count, real, flops, flag], [pending.loss_sum, pending.miscount])
        else:
            sums = self._all_sum([count, real, flops, flag, 0.0, 0.0])
        global_count, global_real, global_flops, flags, loss_global, miscount_global = sums
        self._settle(loss_global, miscount_global)
        return global_count, global_real, global_flops, flags > 0

    def _settle_pending(self) -> None:
        """Sum the last step's loss over ranks now (before an evaluation, a checkpoint or the end)."""
        if self._pending is None:
            return
        loss_global, miscount_global = self._all_sum([], [self._pending.loss_sum, self._pending.miscount])
        self._settle(loss_global, miscount_global)

    def _settle(self, loss_global: float, miscount_global: float) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if miscount_global:
            raise LossCountMismatch(
                f"loop {self.ctx.train.loop!r}: at step {pending.step} compute_loss scored a different number of "
                f"tokens than count_tokens said (off by {miscount_global:.0f} over all ranks); make "
                f"count_tokens match compute_loss")
        if pending.logs:
            self._log_train(pending, loss_global / max(pending.global_count, 1.0))

    def _advance_position(self) -> None:
        p = self.progress
        p.step += 1
        p.step_in_epoch += 1
        if p.step_in_epoch >= self.train_data.steps_per_epoch:
            p.epoch, p.step_in_epoch = p.epoch + 1, 0

    def _after_step(self) -> None:
        """Evaluate (saving the best weights on an improvement), then checkpoint, when due; the last step
        always does both."""
        p, e, c = self.progress, self.ctx.eval, self.ctx.checkpoint
        final = p.step >= self.total_steps
        evaluates = final or bool(e.every_steps and p.step % e.every_steps == 0)
        periodic_save = bool(c.every_steps and p.step % c.every_steps == 0)
        if evaluates or periodic_save:
            self._settle_pending()  # nothing is evaluated or saved before its loss/count check
        if evaluates:
            # may set stopped_early (after an evaluation: already settled); a preemption inside it saves the
            # RNG states from before it, so the resumed run repeats the same evaluation
            self._evaluate_and_track(ckpt.capture_rng_state())
        if (final or p.stopped_early or periodic_save) and self._saved_step != p.step:
            self._save()

    def _finish(self) -> None:
        self._settle_pending()
        p = self.progress
        if p.last_eval_step != p.step:
            self._evaluate_and_track(ckpt.capture_rng_state())
        if self._saved_step != p.step:
            self._save()
        test_loss, tested_tag = self._test()
        self._log_samples()
        self._write_results(p.last_eval_loss, test_loss, tested_tag)

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, split: str, rng_state: dict) -> Optional[float]:
        """Mean loss over ``split`` on all ranks (None when the split is empty). Raises _Preempted (carrying
        ``rng_state``) as soon as any rank is asked to stop, checked before every batch."""
        seqs = RankSequences.open(self.ctx.data_dir, self.ctx.manifest, split, self.sp.dp_rank, self.sp.dp_size)
        if len(seqs) == 0:
            return None
        self._beat("eval", step=self.progress.step)
        self.engine.eval()
        interrupted = []
        try:
            loss_sum, tokens = self.loop.evaluate(self.engine, self._until_preempted(
                eval_batches(seqs, self.collator, self.eval_micro, self.ctx.eval.max_batches), interrupted))
        finally:
            self.engine.train()
        if interrupted:
            raise _Preempted(rng_state)
        total_loss, total_tokens = self._all_sum([float(loss_sum), float(tokens)])
        return total_loss / total_tokens if total_tokens else None

    def _until_preempted(self, batches: Iterator[dict], interrupted: list) -> Iterator[dict]:
        """``batches`` until the ranks agree one was asked to stop (then ``interrupted`` gets an entry).

        One 8-byte all-reduce per evaluation batch, so every rank stops before the same batch (ZeRO-3's
        forward gathers parameters from all ranks); a stop waits for one batch at most.
        """
        for batch in batches:
            if self._any_rank_preempted():
                interrupted.append(True)
                return
            yield batch

    def _evaluate_and_track(self, rng_state: dict) -> None:
        p, e = self.progress, self.ctx.eval
        loss = self._evaluate("validation", rng_state)
        p.last_eval_step, p.last_eval_loss = p.step, loss
        if loss is None:
            return
        self.ctx.logger.scalars(p.step, {"eval/loss": loss, "eval/perplexity": perplexity(loss)}, kind="eval")
        self.ctx.logger.line(f"step {p.step:>6} | eval loss {loss:.4f} | ppl {perplexity(loss):.2f}")
        if p.best_eval_loss is None or loss < p.best_eval_loss - e.early_stopping_min_delta:
            p.best_eval_loss, p.evals_without_improvement = loss, 0
            p.best_tag = ckpt.tag_for_step(p.step)
            if self.ctx.checkpoint.keep_best:
                if self._any_rank_preempted():  # the full checkpoint first; the resumed run saves the best
                    p.best_save_pending = True
                    raise _Preempted(rng_state)
                self._save_best()
        else:
            p.evals_without_improvement += 1
            if e.early_stopping_patience and p.evals_without_improvement >= e.early_stopping_patience:
                p.stopped_early = True
                self.ctx.logger.line(f"early stopping at step {p.step}: no eval improvement > "
                                     f"{e.early_stopping_min_delta} for {p.evals_without_improvement} evals")

    def _test(self) -> tuple[Optional[float], Optional[str]]:
        """Evaluate the test split once, with the best checkpoint's weights when eval.test_with is best."""
        p = self.progress
        tag = ckpt.tag_for_step(p.step)
        best = best_weights.best_folder(self.root, p.best_tag or "")
        if self.ctx.eval.test_with == "best" and p.best_tag and p.best_tag != tag and \
                (best / ckpt.COMPLETE_MARKER).is_file():
            # Weights only, no optimizer state: training is over.
            best_weights.load_best_weights(self.engine.module, best, self.rank)
            tag = p.best_tag
        loss = self._evaluate("test", ckpt.capture_rng_state())
        if loss is not None:
            self.ctx.logger.scalars(p.step, {"test/loss": loss, "test/perplexity": perplexity(loss)}, kind="test")
            self.ctx.logger.line(f"test loss {loss:.4f} | ppl {perplexity(loss):.2f} (weights of {tag})")
        return loss, tag

    # ------------------------------------------------------------------ checkpoints

    def _save(self, rng_state: Optional[dict] = None) -> None:
        """Save a complete checkpoint for the current step on all ranks (a collective); ``rng_state`` (from
        ckpt.capture_rng_state) replaces the current RNG states in it."""
        p = self.progress
        started = time.perf_counter()
        self._beat("save", step=p.step)
        tag = ckpt.tag_for_step(p.step)
        folder = self.root / tag
        if self.rank == 0 and folder.exists() and not ckpt.is_complete(folder):
            shutil.rmtree(folder)  # left by a save that was killed; start it clean
        dist.barrier()
        state = {"step": p.step, "epoch": p.epoch, "data_position": {"epoch": p.epoch,
                 "step_in_epoch": p.step_in_epoch}, "world_size": self.world_size,
                 "config_hash": self.ctx.config_hash, "manifest_cache_key": self.ctx.manifest.get("cache_key"),
                 "eval_loss": p.last_eval_loss if p.last_eval_step == p.step else None, "progress": asdict(p),
                 "global_batch_size": self.train_data.global_batch_size,
                 "sequences_consumed_in_epoch": p.step_in_epoch * self.train_data.global_batch_size,
                 "optimizer_param_groups": len(self.engine.optimizer.param_groups),
                 "sequence_parallel_size": self.sp.size,
                 "weight_decay": self.ctx.train.weight_decay}
        self.engine.save_checkpoint(str(self.root), tag=tag, client_state={"zerotune": state}, save_latest=False)
        ckpt.save_rng_state(folder / f"rng-rank{self.rank}.safetensors", rng_state)
        if self.probe_ids is not None:
            from training.probe import save_probe

            save_probe(self.engine.module, self.probe_ids, folder / "probe.safetensors")
        if self.rank == 0:
            (folder / ckpt.STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
            if os.environ.get(FAULT_KILL_IN_SAVE_ENV) == str(p.step):
                os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()
        if self.rank == 0:
            ckpt.mark_complete(folder)
            ckpt.write_pointer(self.root, "latest", tag)
            ckpt.record_save_time(self.root, tag, time.perf_counter() - started)
            ckpt.prune(self.root, self.ctx.checkpoint.keep_last, set())
        dist.barrier()
        self._saved_step = p.step
        self.ctx.logger.line(f"step {p.step:>6} | saved checkpoint {tag} in {time.perf_counter() - started:.1f} s")

    def _save_best(self) -> None:
        """Save the new best evaluation's weights only (a collective); full checkpoints keep their cadence."""
        p = self.progress
        p.best_save_pending = False
        best_weights.save_best_weights(self.engine.module, self.root, p.best_tag,
                                       {"step": p.step, "eval_loss": p.best_eval_loss}, self.probe_ids, self.rank)
        self.ctx.logger.line(f"step {p.step:>6} | saved best weights {p.best_tag}")

    def _maybe_resume(self) -> None:
        if self.ctx.checkpoint.resume == "never":  # train.py refused a run dir holding checkpoints
            return
        tag, notes = ckpt.find_resume_tag(self.root)
        for note in notes:
            self.ctx.logger.line(f"warning: {note}")
        if tag is None:
            return
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
        self.progress = Progress(**state["progress"])
        self._saved_step = self.progress.step
        if saved_world == self.world_size:
            self.ctx.logger.line(f"resumed from {tag} (step {self.progress.step}, epoch {self.progress.epoch})")
        else:
            t = self.train_data
            self.ctx.logger.line(
                f"resumed from {tag} (step {self.progress.step}, epoch {self.progress.epoch}) saved on "
                f"{saved_world} ranks, now {self.world_size}: loaded its universal form {load_tag} (optimizer "
                f"state, LR schedule, data position kept); global batch {t.global_batch_size} = micro "
                f"{t.micro_batch_size} x accumulation {t.accumulation} x {self.world_size} ranks")

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
        saved_batch, batch = state.get("global_batch_size"), self.train_data.global_batch_size
        check_resume_size(self.root / tag, state, self.sp.size, batch)
        if state["world_size"] != self.world_size and saved_batch != batch:
            # The data position counts whole global batches: another size would skip or repeat sequences.
            raise ckpt.ResumeError(
                f"{self.root / tag} was saved on {state['world_size']} data-parallel ranks with global batch "
                f"{saved_batch}, but this run has {self.world_size} ranks x micro "
                f"{self.train_data.micro_batch_size} x accumulation {self.train_data.accumulation} = {batch}; "
                f"set train.global_batch_size: {saved_batch} (micro-batch and accumulation then adapt), or "
                f"start a new output_dir")
        saved_groups = state.get("optimizer_param_groups")  # absent before it was recorded: built to match
        groups = len(self.engine.optimizer.param_groups)
        if saved_groups is not None and saved_groups != groups:  # one group saved (weight decay 0), and weight decay is set now
            raise ckpt.ResumeError(
                f"{self.root / tag} holds optimizer state for {saved_groups} parameter group (saved with "
                f"train.weight_decay {state.get('weight_decay')}) but train.weight_decay "
                f"{self.ctx.train.weight_decay} needs {groups} (decay, and none for biases and norms); resume "
                f"with train.weight_decay: {state.get('weight_decay')}, or start a new output_dir")
        if state["manifest_cache_key"] != self.ctx.manifest.get("cache_key"):
            raise ckpt.ResumeError(
                f"{self.root / tag} was trained on different prepared data (manifest cache_key changed); the "
                f"saved data position would be meaningless. Use a new output_dir, or prepare the old data again")
        if state["config_hash"] != self.ctx.config_hash:
            self.ctx.logger.line(f"warning: the config differs from the one {tag} was saved with; continuing "
                                 f"with the new one")

    # ------------------------------------------------------------------ helpers

    def _beat(self, phase: str, micro: int = 0, step: Optional[int] = None) -> None:
        """Heartbeat: this rank enters ``phase`` of ``step`` (default: the step being run)."""
        if self.ctx.heartbeat is not None:
            self.ctx.heartbeat.beat(self.progress.step + 1 if step is None else step, phase, micro)

    def _all_sum(self, values: list[float], device_values: list[torch.Tensor] = ()) -> list[float]:
        """Sum ``values`` (host floats), then ``device_values`` (0-d tensors on the compute device, not
        synced first), over ranks in one all-reduce; one host sync, when the sums come back."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if device_values:
            t = torch.cat([t, torch.stack([v.double() for v in device_values])])
        dist.all_reduce(t)
        return t.tolist()

    def _stage0_grad_norm(self) -> Optional[torch.Tensor]:
        """Without ZeRO, DeepSpeed clips but does not report the norm; the gradients are already averaged
        over ranks after the boundary backward, so take the (pre-clipping) norm here."""
        if self.ctx.zero_stage != 0:
            return None
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else None

    def _probe_ids(self) -> Optional[torch.Tensor]:
        seqs = first_sequences(self.ctx.data_dir, self.ctx.manifest, "validation", PROBE_SEQUENCES) or \
            first_sequences(self.ctx.data_dir, self.ctx.manifest, "train", PROBE_SEQUENCES)
        if not seqs:
            return None
        length = min([PROBE_TOKENS] + [len(s["input_ids"]) for s in seqs])
        return torch.tensor([list(s["input_ids"][:length]) for s in seqs], dtype=torch.long)

    def _logs_step(self, step: int) -> bool:
        return step % self.ctx.log_every_steps == 0 or step == self.total_steps

    def _log_train(self, s: "_PendingStep", loss: float) -> None:
        tokens_per_sec = s.global_real / s.step_time
        values = {"train/loss": loss, "train/lr": s.lr, "train/grad_norm": _finite(s.grad_norm),
                  "train/tokens_per_sec": tokens_per_sec,
                  "train/supervised_tokens_per_sec": s.global_count / s.step_time,
                  "train/step_time_sec": s.step_time, "train/data_wait_sec": s.data_wait,
                  "train/mfu": self._mfu(s.global_flops / s.step_time), "train/memory_gb": memory_gb(),
                  "train/skipped_steps": float(getattr(self.engine, "skipped_steps", 0))}
        self.ctx.logger.scalars(s.step, values)
        self.ctx.logger.line(f"step {s.step:>6}/{self.total_steps} | loss {loss:.4f} | lr {s.lr:.2e} | "
                             f"{tokens_per_sec:,.0f} tok/s | {s.step_time:.2f}s")

    def _useful_flops(self, batch: dict) -> float:
        """This micro-batch's useful training FLOPs (training.tb.training_flops), from host-side bounds."""
        from training.model import document_bounds

        shape = self.ctx.model_shape
        return training_flops(shape["num_params"], shape["num_layers"], shape["hidden_size"],
                              int(batch["attention_mask"].sum()), squared_document_tokens(document_bounds(batch)[0]))

    def _mfu(self, flops_per_sec: float) -> Optional[float]:
        """Model FLOPs utilisation on GPU: the step's useful FLOPs over all ranks per second / (peak x ranks)."""
        peak = peak_flops_per_device(self.ctx.train.precision)
        if peak is None:
            return None
        return flops_per_sec / (peak * self.world_size)

    def _log_samples(self) -> None:
        from training.samples import generate_samples

        count = self.ctx.eval.sample_generations
        if count < 1:
            return
        text = generate_samples(self.engine.module, self.ctx.tokenizer, self.ctx.data_dir, self.ctx.manifest,
                                count, self.ctx.eval.max_new_tokens, synced=self.zero3_multi_rank(),
                                device=self.device)
        self.ctx.logger.text("samples/validation", text, self.progress.step)

    def zero3_multi_rank(self) -> bool:
        return self.ctx.zero_stage == 3 and self.world_size > 1

    def _write_results(self, final_loss, test_loss, tested_tag) -> None:
        if self.rank != 0:
            return
        p = self.progress
        results = {"steps": p.step, "total_steps": self.total_steps, "stopped_early": p.stopped_early,
                   "final_eval_loss": final_loss,
                   "final_eval_perplexity": perplexity(final_loss) if final_loss is not None else None,
                   "best_eval_loss": p.best_eval_loss, "best_tag": p.best_tag,
                   "test_loss": test_loss,
                   "test_perplexity": perplexity(test_loss) if test_loss is not None else None,
                   "test_weights_tag": tested_tag}
        path = self.ctx.output_dir / "results.json"
        path.write_text(json.dumps(results, indent=2, allow_nan=True), encoding="utf-8")


@dataclass
class _PendingStep:
    """A finished step whose loss is not yet summed over ranks, with what its log line needs."""

    step: int
    loss_sum: torch.Tensor  # this rank's, fp64 on the compute device
    miscount: torch.Tensor  # this rank's |tokens scored - tokens counted|, fp64 on the compute device
    global_count: float
    global_real: float
    global_flops: float
    lr: float
    step_time: float
    data_wait: float
    logs: bool
    grad_norm: object = None  # a float or 0-d tensor, read when the step is logged


def _grad_norm_value(engine, fallback: Optional[torch.Tensor]):
    """The step's gradient norm as DeepSpeed reports it (or ``fallback``), not yet synced to the host."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return fallback
    return norm.detach().clone() if torch.is_tensor(norm) else norm


def _finite(value) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
