"""Evaluation during training: validation and test losses summed over all ranks, a stop between evaluation
batches when a rank is preempted, the best-loss and early-stopping bookkeeping, and the end-of-run report.

Every method of :class:`Evaluator` is a collective: all ranks call it at the same point.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Optional

from training import best_weights
from training import checkpoint as ckpt
from training.config import EvalConfig
from training.data import Collator, RankSequences, eval_batches
from training.preemption import Preempted, PreemptionFlag
from training.resume import Progress
from training.tb import perplexity


class Evaluator:
    """Evaluates one rank's engine through the run's loop; ``all_sum`` sums host floats over ranks in one
    all-reduce (the driver's), ``preempt`` is this rank's preemption flag. ``data_rank`` of ``data_ranks``
    is the rank's data-parallel place (its sequence-parallel group reads one rank's share of a split)."""

    def __init__(self, engine, loop, ctx, collator: Collator, all_sum: Callable[[list], list],
                 preempt: PreemptionFlag, rank: int, world_size: int, data_rank: int, data_ranks: int):
        self.engine, self.loop, self.ctx, self.collator = engine, loop, ctx, collator
        self.all_sum, self.preempt = all_sum, preempt
        self.rank, self.world_size = rank, world_size
        self.data_rank, self.data_ranks = data_rank, data_ranks
        self.micro_batch_size = ctx.eval.micro_batch_size or ctx.train.micro_batch_size

    def any_rank_preempted(self) -> bool:
        """Whether any rank got a preemption signal (a collective: every rank must ask at the same point)."""
        return self.all_sum([1.0 if self.preempt.requested else 0.0])[0] > 0

    def evaluate(self, split: str, step: int, rng_state: dict) -> Optional[float]:
        """Mean loss over ``split`` on all ranks (None when the split is empty). Raises Preempted (carrying
        ``rng_state``) as soon as any rank is asked to stop, checked before every batch."""
        seqs = RankSequences.open(self.ctx.data_dir, self.ctx.manifest, split, self.data_rank, self.data_ranks)
        if len(seqs) == 0:
            return None
        if self.ctx.heartbeat is not None:
            self.ctx.heartbeat.beat(step, "eval", 0)
        self.engine.eval()
        interrupted = []
        try:
            loss_sum, tokens = self.loop.evaluate(self.engine, self._until_preempted(
                eval_batches(seqs, self.collator, self.micro_batch_size, self.ctx.eval.max_batches), interrupted))
        finally:
            self.engine.train()
        if interrupted:
            raise Preempted(rng_state)
        total_loss, total_tokens = self.all_sum([float(loss_sum), float(tokens)])
        return total_loss / total_tokens if total_tokens else None

    def _until_preempted(self, batches: Iterator[dict], interrupted: list) -> Iterator[dict]:
        """``batches`` until the ranks agree one was asked to stop (then ``interrupted`` gets an entry).

        One 8-byte all-reduce per evaluation batch, so every rank stops before the same batch (ZeRO-3's
        forward gathers parameters from all ranks); a stop waits for one batch at most.
        """
        for batch in batches:
            if self.any_rank_preempted():
                interrupted.append(True)
                return
            yield batch

    def validate(self, progress: Progress, rng_state: dict) -> bool:
        """Evaluate the validation split at ``progress.step`` and record it (:func:`track`); True when it is
        a new best."""
        p = progress
        loss = self.evaluate("validation", p.step, rng_state)
        p.last_eval_step, p.last_eval_loss = p.step, loss
        if loss is None:
            return False
        self.ctx.logger.scalars(p.step, {"eval/loss": loss, "eval/perplexity": perplexity(loss)}, kind="eval")
        self.ctx.logger.line(f"step {p.step:>6} | eval loss {loss:.4f} | ppl {perplexity(loss):.2f}")
        return track(p, loss, self.ctx.eval, self.ctx.logger)

    def test(self, progress: Progress, root: Path) -> tuple[Optional[float], Optional[str]]:
        """Evaluate the test split once, with the best checkpoint's weights when eval.test_with is best;
        returns the loss and the tag whose weights were tested."""
        p = progress
        tag = ckpt.tag_for_step(p.step)
        best = best_weights.best_folder(root, p.best_tag or "")
        if self.ctx.eval.test_with == "best" and p.best_tag and p.best_tag != tag and \
                (best / ckpt.COMPLETE_MARKER).is_file():
            # Weights only, no optimizer state: training is over.
            best_weights.load_best_weights(self.engine.module, best, self.rank)
            tag = p.best_tag
        loss = self.evaluate("test", p.step, ckpt.capture_rng_state())
        if loss is not None:
            self.ctx.logger.scalars(p.step, {"test/loss": loss, "test/perplexity": perplexity(loss)}, kind="test")
            self.ctx.logger.line(f"test loss {loss:.4f} | ppl {perplexity(loss):.2f} (weights of {tag})")
        return loss, tag

    def log_samples(self, step: int) -> None:
        """Generate eval.sample_generations validation continuations into TensorBoard (a collective under
        ZeRO-3 on several ranks)."""
        from training.samples import generate_samples

        count = self.ctx.eval.sample_generations
        if count < 1:
            return
        text = generate_samples(self.engine.module, self.ctx.tokenizer, self.ctx.data_dir, self.ctx.manifest,
                                count, self.ctx.eval.max_new_tokens, synced=self.ctx.zero_stage == 3 and self.world_size > 1,
                                device=self.engine.device)
        self.ctx.logger.text("samples/validation", text, step)


def track(progress: Progress, loss: float, cfg: EvalConfig, logger) -> bool:
    """Record a validation ``loss`` in ``progress``: a new best (better by more than
    eval.early_stopping_min_delta) resets the patience count and names the best tag, otherwise the count
    grows and ``stopped_early`` is set when it reaches eval.early_stopping_patience. True on a new best."""
    p = progress
    if p.best_eval_loss is None or loss < p.best_eval_loss - cfg.early_stopping_min_delta:
        p.best_eval_loss, p.evals_without_improvement = loss, 0
        p.best_tag = ckpt.tag_for_step(p.step)
        return True
    p.evals_without_improvement += 1
    if cfg.early_stopping_patience and p.evals_without_improvement >= cfg.early_stopping_patience:
        p.stopped_early = True
        logger.line(f"early stopping at step {p.step}: no eval improvement > "
                    f"{cfg.early_stopping_min_delta} for {p.evals_without_improvement} evals")
    return False


def write_results(output_dir: Path, progress: Progress, total_steps: int, final_loss: Optional[float],
                  test_loss: Optional[float], tested_tag: Optional[str]) -> None:
    """results.json: steps, early stop, final validation, best and test losses (rank 0 calls it)."""
    p = progress
    results = {"steps": p.step, "total_steps": total_steps, "stopped_early": p.stopped_early,
               "final_eval_loss": final_loss,
               "final_eval_perplexity": perplexity(final_loss) if final_loss is not None else None,
               "best_eval_loss": p.best_eval_loss, "best_tag": p.best_tag,
               "test_loss": test_loss,
               "test_perplexity": perplexity(test_loss) if test_loss is not None else None,
               "test_weights_tag": tested_tag}
    path = output_dir / "results.json"
    path.write_text(json.dumps(results, indent=2, allow_nan=True), encoding="utf-8")
