"""The `data` section of a run config: everything `zerotune prep` needs, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class DataConfig:
    """How raw files become packed, tokenized shards.

    Record shapes (``record_type``):
      * ``prompt_response``: one column for the prompt, one for the response.
      * ``messages``: a list of ``{"role", "content"}`` dicts (chat).
      * ``text``: plain text for continued pretraining (every token carries loss).
      * ``auto``: pick from the columns present (messages, then prompt/response, then text).
    """

    sources: list[str] = field(default_factory=list)
    output_dir: str = "prepared"
    seq_len: int = 2048
    record_type: Literal["auto", "prompt_response", "messages", "text"] = "auto"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    text_column: str = "text"
    system_prompt: Optional[str] = None
    # "chat" applies the tokenizer's chat template; "format" uses format_string, which
    # must contain {prompt} and end its prompt part right before {response}.
    template: Literal["chat", "format"] = "chat"
    format_string: Optional[str] = None
    train_on_prompt: bool = False
    excess_length: Literal["drop", "truncate", "error"] = "truncate"
    dedup: bool = True
    packing: bool = True
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    num_shards: int = 4
    num_proc: int = 1
    # Rows per batch in the datasets.map stages (memory stays flat as data grows).
    map_batch_size: int = 1000
