"""The step loop: accumulation, loss normalisation, logging, and when to evaluate and save.

Evaluation and early stopping live in training/evaluation.py, saving and resuming in training/resume.py;
the driver decides when each runs, and stops every rank together on a preemption.

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

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from training import checkpoint as ckpt
from training.config import CheckpointConfig, EvalConfig, TrainConfig
from training.data import Collator, RankSequences, TrainBatches
from training.evaluation import Evaluator, write_results
from training.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionFlag
from training.resume import FAULT_KILL_IN_SAVE_ENV, Checkpointer, Progress  # noqa: F401  (the hook's name, re-exported)
from training.sequence_parallel import local_supervised_tokens, placement
from training.tb import MetricsLogger, memory_gb, peak_flops_per_device, squared_document_tokens, training_flops


class LossCountMismatch(RuntimeError):
    """A loop whose compute_loss scored a different number of tokens than its count_tokens promised.

    Found from the summed check, so every rank raises it at the same step boundary and stops cleanly.
    """

    user_error = True


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
        t = ctx.train
        pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
        pad_to = ctx.manifest["seq_len"] if t.pad_to == "seq_len" else None
        self.collator = Collator(pad_id, pad_to)
        self.sp = placement(engine.module)  # a sequence-parallel group reads one data-parallel rank's batches
        # Every rank opens the whole training split: the order is global, each step deals out its share.
        self.train_data = TrainBatches(
            RankSequences.open(ctx.data_dir, ctx.manifest, "train", rank=0, world_size=1), self.collator,
            t.micro_batch_size, t.gradient_accumulation_steps, self.sp.dp_size, self.sp.dp_rank, t.seed)
        self.total_steps = total_steps
        self.progress = Progress()
        self.preempt = PreemptionFlag()
        self.checkpoints = Checkpointer(engine, ctx, self.train_data, self.rank, self.world_size, self.sp.size)
        self.evaluator = Evaluator(engine, loop, ctx, self.collator, self._all_sum, self.preempt, self.rank,
                                   self.world_size, self.sp.dp_rank, self.sp.dp_size)
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
        except Preempted as stop:
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
            raise Preempted(rng_before_step)
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
        test_loss, tested_tag = self.evaluator.test(p, self.checkpoints.root)
        self.evaluator.log_samples(p.step)
        if self.rank == 0:
            write_results(self.ctx.output_dir, p, self.total_steps, p.last_eval_loss, test_loss, tested_tag)

    # ------------------------------------------------------------------ evaluation and checkpoints

    def _evaluate_and_track(self, rng_state: dict) -> None:
        """Validate (may set stopped_early); on a new best, save its weights, unless a rank was preempted:
        then the full checkpoint comes first and the resumed run saves the best."""
        if not self.evaluator.validate(self.progress, rng_state) or not self.ctx.checkpoint.keep_best:
            return
        if self.evaluator.any_rank_preempted():
            self.progress.best_save_pending = True
            raise Preempted(rng_state)
        self._save_best()

    def _save(self, rng_state: Optional[dict] = None) -> None:
        """Save a complete checkpoint of the current step on all ranks (see resume.Checkpointer.save)."""
        self._beat("save", step=self.progress.step)
        self.checkpoints.save(self.progress, rng_state)
        self._saved_step = self.progress.step

    def _save_best(self) -> None:
        self.checkpoints.save_best(self.progress)

    def _maybe_resume(self) -> None:
        progress = self.checkpoints.resume()
        if progress is not None:
            self.progress, self._saved_step = progress, progress.step

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
