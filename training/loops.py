"""Training loops: small classes, registered by name, that turn a batch into a loss.

A loop computes ``(loss_sum, token_count)`` from a batch and evaluates; the driver owns everything else
(accumulation, normalisation over ranks, clipping, stepping, checkpoints, logging, resume). See
docs/custom-loops.md for writing one and naming it by import path ``package.module:ClassName``.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable

import torch

from data_prep.format import IGNORE_INDEX

_REGISTRY: dict[str, type["Loop"]] = {}


class LoopError(ValueError):
    """``train.loop`` names no registered loop and no importable class."""

    user_error = True


def register_loop(name: str) -> Callable[[type], type]:
    """Class decorator: make a loop available as ``train.loop: <name>``."""
    def wrap(cls: type) -> type:
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return wrap


def registered_loops() -> list[str]:
    return sorted(_REGISTRY)


def get_loop(name: str) -> type["Loop"]:
    """The loop class for ``name``: a registered name, or ``package.module:ClassName``."""
    if ":" in name:
        return _import_loop(name)
    if name not in _REGISTRY:
        raise LoopError(f"train.loop: {name!r} is not a registered loop (registered: "
                        f"{', '.join(registered_loops())}); a loop of your own is named "
                        f"package.module:ClassName")
    return _REGISTRY[name]


def _import_loop(path: str) -> type["Loop"]:
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LoopError(f"train.loop: cannot import module {module_name!r} ({exc}); is its folder on "
                        f"PYTHONPATH?") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Loop)):
        raise LoopError(f"train.loop: {path!r} is not a subclass of training.loops.Loop in module "
                        f"{module_name!r}")
    return cls


def supervised_count(labels: torch.Tensor) -> int:
    """Tokens scored by a next-token loss: labels[:, 1:] that are not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class Loop:
    """Base class. Subclasses override ``compute_loss`` and may override ``prepare_batch``/``evaluate``.

    The driver calls ``prepare_batch`` once per micro-batch before anything else, then
    ``count_tokens`` on every micro-batch of an optimizer step (to normalise by the global count
    before any backward), then ``compute_loss``. ``count_tokens`` must equal the count
    ``compute_loss`` returns; the driver checks.
    """

    name = "base"
    # Tokens per chunk of the chunked loss (training.loss); 0 is the plain loss. The run sets it from
    # train.loss_chunk_tokens.
    loss_chunk_tokens = 0

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def prepare_batch(self, batch: dict) -> dict:
        """Adjust a collated batch (e.g. rewrite labels); runs on CPU before the batch moves to the device."""
        return batch

    def count_tokens(self, batch: dict) -> int:
        """How many tokens ``compute_loss`` will score on this batch."""
        return supervised_count(batch["labels"])

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (sum of per-token losses in fp32, number of tokens scored) for one micro-batch."""
        raise NotImplementedError

    def evaluate(self, model, batches: Iterable[dict]) -> tuple[float, int]:
        """Local (loss sum, token count) over ``batches``, without gradients; the driver reduces over ranks."""
        loss_total, tokens = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                loss_sum, count = self.compute_loss(model, self.prepare_batch(batch))
                loss_total += float(loss_sum)
                tokens += int(count)
        return loss_total, tokens


@register_loop("sft")
class SFTLoop(Loop):
    """Supervised fine-tuning: loss on the tokens data prep marked as supervised (labels != -100)."""

    def compute_loss(self, model, batch):
        from training.model import packed_loss

        return packed_loss(model, batch, self.loss_chunk_tokens)


@register_loop("pretrain")
class PretrainLoop(SFTLoop):
    """Continued pretraining: loss on every real token except the first of each document and padding."""

    def prepare_batch(self, batch):
        labels = batch["input_ids"].clone()
        first_of_document = batch["position_ids"] == 0
        labels[first_of_document | (batch["attention_mask"] == 0)] = IGNORE_INDEX
        return {**batch, "labels": labels}
