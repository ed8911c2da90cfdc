"""The `data` section of a run config: everything `zerotune prep` needs, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

RecordType = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_response", "text"]

# ShareGPT speaker names (``from``) and the chat role each becomes; data.sharegpt_roles replaces this map.
DEFAULT_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                          "assistant": "assistant", "chatgpt": "assistant", "tool": "tool", "observation": "tool",
                          "function_call": "assistant"}


@dataclass
class SourceConfig:
    """One entry of data.sources given as a mapping: a path plus its own record type and column names.

    Every field left out (null) takes the value of the same key in the data section.
    """

    path: str = ""
    record_type: Optional[RecordType] = None
    prompt_column: Optional[str] = None
    response_column: Optional[str] = None
    messages_column: Optional[str] = None
    conversations_column: Optional[str] = None
    instruction_column: Optional[str] = None
    input_column: Optional[str] = None
    output_column: Optional[str] = None
    text_column: Optional[str] = None
    tools_column: Optional[str] = None
    sharegpt_roles: Optional[dict[str, str]] = None


@dataclass
class DataConfig:
    """How raw files become packed, tokenized shards.

    Record shapes (``record_type``, per source when a data.sources entry sets its own):
      * ``messages``: OpenAI-style ``{"role", "content"}`` turns (system/user/assistant/tool), with
        ``tool_calls`` on assistant turns and an optional per-row ``tools`` column for the template.
      * ``sharegpt``: ``conversations`` of ``{"from", "value"}`` turns, speakers mapped by sharegpt_roles.
      * ``alpaca``: instruction + optional input -> prompt, output -> response.
      * ``prompt_response``: one column for the prompt, one for the response.
      * ``text``: plain text for continued pretraining (every token carries loss).
      * ``auto``: pick from the columns present (messages/conversations, alpaca, prompt/response, text).
    Text is kept as written: Unicode NFC and unified line endings only; strip_whitespace and
    collapse_blank_lines are opt-in cleaning steps.
    """

    sources: list[Union[str, SourceConfig]] = field(default_factory=list)
    output_dir: str = "prepared"
    seq_len: int = 2048
    record_type: RecordType = "auto"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    conversations_column: str = "conversations"
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    text_column: str = "text"
    tools_column: str = "tools"
    sharegpt_roles: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SHAREGPT_ROLES))
    system_prompt: Optional[str] = None
    # "chat" applies the chat template; "format" uses format_string, which
    # must contain {prompt} and end its prompt part right before {response}.
    template: Literal["chat", "format"] = "chat"
    # Overrides the tokenizer's chat template: a Jinja file, or a built-in name (data_prep/chat_templates).
    chat_template: Optional[str] = None
    format_string: Optional[str] = None
    train_on_prompt: bool = False
    # Which assistant turns carry loss (a turn with "train": false or "weight": 0 never does).
    train_on: Literal["all_assistant", "last_turn"] = "all_assistant"
    # Opt-in cleaning (off: text is kept as written): strip each field's ends and trailing spaces on
    # its lines; collapse three or more newlines into one blank line.
    strip_whitespace: bool = False
    collapse_blank_lines: bool = False
    excess_length: Literal["drop", "truncate", "error"] = "truncate"
    dedup: bool = True
    packing: bool = True
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    num_shards: int = 4
    # Processes for the datasets.map stages (clean, template + tokenize), one tokenizer thread each:
    # "auto" is the CPUs this process may use (affinity, cgroup quota), at most 16; a stage never uses
    # more than its batches of map_batch_size rows, and one batch runs in this process (data_prep/procs.py).
    num_proc: Union[int, Literal["auto"]] = "auto"
    # Rows per batch in the datasets.map stages (memory stays flat as data grows).
    map_batch_size: int = 1000
