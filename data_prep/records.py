"""Record shapes: each source row (messages, sharegpt, alpaca, prompt_response, text) becomes one canonical
record, or a :class:`BadRow` saying why it cannot.

The canonical record is a conversation or a text, so sources of different shapes go through one pipeline:
``{"messages": [turn, ...], "tools": "<JSON or empty>", "text": "<text or empty>"}``. A turn is
``{"role", "content", "tool_calls" (JSON text or ""), "name", "tool_call_id", "train" (bool)}``; tool calls
and tool definitions are kept as JSON text because their shapes vary from row to row (Arrow columns need
one type). Text values are passed through ``normalize`` (clean.py) and otherwise kept as written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

ROLES = ("system", "user", "assistant", "tool")
# What each record type expects, for the error when every row of a file is bad.
EXPECTED_SHAPE = {
    "messages": 'a list of {"role": "system"|"user"|"assistant"|"tool", "content": "..."} turns (assistant turns '
                'may carry "tool_calls"; a tool turn answers an earlier call)',
    "sharegpt": 'a list of {"from": "human"|"gpt"|"system"|..., "value": "..."} turns (speakers mapped by '
                'data.sharegpt_roles)',
    "alpaca": 'text columns instruction, output and optionally input',
    "prompt_response": "two text columns, the prompt and the response",
    "text": "one text column",
}


class BadRow(Exception):
    """A row that cannot become a record; ``reason`` is a short tag counted in the report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Columns:
    """The source columns of one record type: ``{canonical name: (config key, column)}``."""

    kind: str
    names: dict
    roles: dict


Normalize = Callable[[str], str]


def _text(value, key: str, column: str, normalize: Normalize) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{key} {column!r} holds a {type(value).__name__} ({repr(value)[:40]}) where "
                                   f"text is expected")
    return normalize(value)


def _turn(role: str, content: str, train: bool = True, tool_calls: str = "", name: str = "",
          tool_call_id: str = "") -> dict:
    return {"role": role, "content": content, "tool_calls": tool_calls, "name": name, "tool_call_id": tool_call_id,
            "train": train}


def _without_nulls(value):
    """Drop null-valued keys: Arrow gives every struct in a column the union of all rows' keys."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _json_value(value, what: str):
    """A JSON-text or already-parsed value, with nulls that Arrow added removed."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRow(f"bad_{what}", f"{what} is not valid JSON ({exc.msg})") from None
    return _without_nulls(value)


def _tool_calls(value, index: int, normalize: Normalize) -> str:
    calls = _json_value(value, "tool_calls")
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise BadRow("bad_tool_calls", f"message {index}: tool_calls must be a list of objects")
    out = []
    for call in calls:
        fn = call.get("function", call)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRow("bad_tool_calls", f"message {index}: a tool call without a function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends arguments as JSON text; templates expect the object
            args = _json_value(args, "tool_calls")
        out.append({"type": "function", **({"id": call["id"]} if isinstance(call.get("id"), str) else {}),
                    "function": {"name": fn["name"], "arguments": _normalize_strings(args, normalize)}})
    return json.dumps(out, ensure_ascii=False) if out else ""


def _normalize_strings(value, normalize: Normalize):
    if isinstance(value, str):
        return normalize(value)
    if isinstance(value, dict):
        return {k: _normalize_strings(v, normalize) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize_strings(v, normalize) for v in value]
    return value


def _train_flag(msg: dict, index: int) -> bool:
    train, weight = msg.get("train"), msg.get("weight")
    if train is not None and not isinstance(train, bool):
        raise BadRow("wrong_type", f"message {index}: train must be true or false, got {train!r}")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
        raise BadRow("wrong_type", f"message {index}: weight must be a number, got {weight!r}")
    return train is not False and weight != 0


def _turn_objects(value, column: str, what: str) -> list[tuple[int, dict]]:
    """The (index, turn) pairs of a conversation column; a wrong shape is a BadRow naming ``what`` i."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRow("wrong_type", f"column {column!r} holds a {type(value).__name__}, not a list of turns")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise BadRow("wrong_type", f"{what} {i} is a {type(msg).__name__} ({str(msg)[:40]!r}), not an object")
    return list(enumerate(value))


def _messages(value, column: str, normalize: Normalize) -> list[dict]:
    turns = []
    for i, msg in _turn_objects(value, column, "message"):
        role = msg.get("role")
        if not isinstance(role, str) or not role.strip():
            raise BadRow("missing_role", f"message {i} has no role")
        if role.strip() not in ROLES:
            raise BadRow("unknown_role", f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        role = role.strip()
        content = msg.get("content")
        if content is not None and not isinstance(content, str):
            raise BadRow("wrong_type", f"message {i}: content holds a {type(content).__name__} where text is "
                                       f"expected")
        calls = _tool_calls(msg["tool_calls"], i, normalize) if role == "assistant" and msg.get("tool_calls") else ""
        turns.append(_turn(role, normalize(content or ""), _train_flag(msg, i), calls,
                           _optional_str(msg, "name"), _optional_str(msg, "tool_call_id")))
    return turns


def _optional_str(msg: dict, key: str) -> str:
    value = msg.get(key)
    return value if isinstance(value, str) else ""


def _sharegpt(value, column: str, roles: dict, normalize: Normalize) -> list[dict]:
    turns = []
    for i, msg in _turn_objects(value, column, "turn"):
        speaker = msg.get("from")
        if not isinstance(speaker, str) or not speaker.strip():
            raise BadRow("missing_role", f"turn {i} has no 'from'")
        role = roles.get(speaker.strip())
        if role not in ROLES:
            raise BadRow("unknown_role", f"turn {i}: unknown speaker {speaker!r} (known: {', '.join(roles)}; "
                                         f"map it with data.sharegpt_roles)")
        text = msg.get("value")
        if text is not None and not isinstance(text, str):
            raise BadRow("wrong_type", f"turn {i}: value holds a {type(text).__name__} where text is expected")
        if speaker.strip() == "function_call":  # the call itself, as JSON text {"name", "arguments"}
            turns.append(_turn("assistant", "", _train_flag(msg, i), _tool_calls([_json_value(text, "tool_calls")],
                                                                                  i, normalize)))
        else:
            turns.append(_turn(role, normalize(text or ""), _train_flag(msg, i)))
    return turns


def check_conversation(turns: list[dict]) -> None:
    """Structural rules every conversation must meet (BadRow otherwise)."""
    if not turns:
        raise BadRow("empty_conversation", "the conversation has no turns")
    open_calls = 0
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant":
            if not turn["content"] and not turn["tool_calls"]:
                raise BadRow("empty_assistant_turn", f"message {i}: an assistant turn with neither content nor "
                                                     f"a tool call")
            open_calls = len(json.loads(turn["tool_calls"])) if turn["tool_calls"] else 0
        elif turn["role"] == "tool":
            if open_calls == 0:
                raise BadRow("tool_without_call", f"message {i}: a tool result with no preceding tool call")
            open_calls -= 1
        else:
            open_calls = 0


def _tools(value, normalize: Normalize) -> str:
    if value is None or value == "":
        return ""
    tools = _json_value(value, "tools")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRow("bad_tools", "tools must be a list of tool definitions (objects)")
    return json.dumps(_normalize_strings(tools, normalize), ensure_ascii=False) if tools else ""


def to_record(row: dict, cols: Columns, normalize: Normalize) -> dict:
    """One raw row (column -> value) as a canonical record; raises BadRow."""
    kind, names = cols.kind, cols.names
    get = {name: row.get(column) for name, (_, column) in names.items()}
    text_of = lambda name: _text(get[name], names[name][0], names[name][1], normalize)  # noqa: E731
    if kind == "text":
        return {"messages": [], "tools": "", "text": text_of("text")}
    if kind == "messages":
        turns = _messages(get["messages"], names["messages"][1], normalize)
    elif kind == "sharegpt":
        turns = _sharegpt(get["messages"], names["messages"][1], cols.roles, normalize)
    elif kind == "alpaca":
        instruction, extra = text_of("instruction"), text_of("input") if "input" in names else ""
        turns = [_turn("user", f"{instruction}\n\n{extra}" if extra else instruction),
                 _turn("assistant", text_of("output"))]
    else:
        turns = [_turn("user", text_of("prompt")), _turn("assistant", text_of("response"))]
    tools = _tools(get["tools"], normalize) if "tools" in names else ""
    if kind in ("messages", "sharegpt"):
        # An empty system prompt (common in ShareGPT exports) means none, not an empty row.
        turns = [t for t in turns if t["role"] != "system" or t["content"].strip()]
        check_conversation(turns)
    return {"messages": turns, "tools": tools, "text": ""}
