"""Stage 1, cleaning: unicode/whitespace normalisation, type checks, empty-field drops, content hashes.

Runs as a batched ``datasets.map`` over one source at a time and emits the canonical columns of its
record type (prompt/response, messages, or text) plus bookkeeping columns that later stages use:
``_drop`` (a drop reason, "" to keep), ``_hash`` (content hash for dedup and the split), ``_phash`` (hash
of the prompt, for cross-split overlap), ``_pprefix`` (hash of the prompt's first characters, for the
redundant-context report) and ``_nhash`` (hash of the content ignoring case, spacing and punctuation, for
the near-duplicate report). Exact deduplication is :func:`first_occurrences` over ``_hash``.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata

import numpy as np

from .errors import DataError
from .readers import Source, row_label

PREFIX_CHARS = 200  # prompts sharing their first 200 characters share a context (the redundant-context report)
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")
_NOT_WORD = re.compile(r"[\W_]+")


def normalize_text(text: str) -> str:
    """NFKC, unified newlines, no trailing spaces on a line, at most one blank line in a row, stripped ends.

    Leading indentation and single spaces are kept on purpose: answers often hold code.
    """
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("\n", text)
    return _MANY_BLANK_LINES.sub("\n\n", text).strip()


def loose_key(text: str) -> str:
    """Text with case, spacing and punctuation removed: rows equal under it are near-duplicates."""
    return _NOT_WORD.sub(" ", text.casefold()).strip()


def _content_texts(kind: str, record: dict) -> list[str]:
    if kind == "messages":
        return [m["content"] for m in record["messages"]]
    return [record[c] for c in canonical_columns(kind)]


def hash64(obj) -> int:
    """A stable signed 64-bit hash of a JSON-serialisable value (sha256 prefix)."""
    digest = hashlib.sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def canonical_columns(kind: str) -> list[str]:
    """The content columns of a record type after cleaning."""
    return {"prompt_response": ["prompt", "response"], "messages": ["messages"], "text": ["text"]}[kind]


def _text_field(value, key: str, column: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key} {column!r} holds a {type(value).__name__} ({str(value)[:40]!r}) where "
                        f"text is expected; quote the value or fix the column")
    return normalize_text(value)


def _messages_field(value, column: str, where: str) -> list[dict]:
    hint = (f"data.messages_column {column!r} must be a list of {{\"role\": ..., \"content\": ...}} objects with "
            f"text values")
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f"{where}: {hint}, got a {type(value).__name__}")
    out = []
    for turn_index, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or "content" not in msg or \
                not isinstance(msg.get("content"), (str, type(None))):
            raise DataError(f"{where}: message {turn_index} is {str(msg)[:60]!r}; {hint}")
        out.append({"role": msg["role"].strip(), "content": normalize_text(msg["content"] or "")})
    return out


def prompt_of(kind: str, record: dict) -> str:
    """The context a record's answer is conditioned on ("" for text): its prompt, or the turns before the
    first assistant turn."""
    if kind == "prompt_response":
        return record["prompt"]
    if kind == "messages":
        parts = []
        for msg in record["messages"]:
            if msg["role"] == "assistant":
                break
            parts.append(f"{msg['role']}: {msg['content']}")
        return "\n".join(parts)
    return ""


def _is_empty(kind: str, record: dict) -> bool:
    if kind == "messages":
        return not record["messages"] or any(not m["content"] or not m["role"] for m in record["messages"])
    return any(not record[c] for c in canonical_columns(kind))


def clean_batch(batch: dict, indices: list[int], *, kind: str, columns: dict, src: Source, src_id: int) -> dict:
    """Clean one batch of raw rows; ``columns`` maps canonical names to (config key, source column)."""
    out = {c: [] for c in canonical_columns(kind)}
    out.update(_drop=[], _hash=[], _phash=[], _pprefix=[], _nhash=[], _src=[], _row=[])
    for pos, row_index in enumerate(indices):
        where = row_label(src, row_index)
        record = {}
        for name, (key, column) in columns.items():
            value = batch[column][pos]
            record[name] = _messages_field(value, column, where) if name == "messages" else \
                _text_field(value, key, column, where)
        prompt = prompt_of(kind, record)
        for name in out:
            if not name.startswith("_"):
                out[name].append(record[name])
        out["_drop"].append("empty_field" if _is_empty(kind, record) else "")
        out["_hash"].append(hash64([kind, record]))
        out["_phash"].append(hash64(prompt) if prompt else 0)
        out["_pprefix"].append(hash64(prompt[:PREFIX_CHARS]) if prompt else 0)
        out["_nhash"].append(hash64([loose_key(t) for t in _content_texts(kind, record)]))
        out["_src"].append(src_id)
        out["_row"].append(row_index)
    return out


def clean_features(kind: str):
    """Arrow features of the cleaned columns (fixed, so sources of different origins concatenate)."""
    from datasets import Features, List, Value

    feats = {"prompt": Value("string"), "response": Value("string"), "text": Value("string"),
             "messages": List({"role": Value("string"), "content": Value("string")})}
    out = {c: feats[c] for c in canonical_columns(kind)}
    out.update(_drop=Value("string"), _hash=Value("int64"), _phash=Value("int64"), _pprefix=Value("int64"),
               _nhash=Value("int64"), _src=Value("int32"), _row=Value("int64"))
    return Features(out)


def first_occurrences(hashes: np.ndarray) -> np.ndarray:
    """Boolean mask, True at the first occurrence of each hash (exact deduplication, order kept)."""
    _, first = np.unique(hashes, return_index=True)
    keep = np.zeros(len(hashes), dtype=bool)
    keep[first] = True
    return keep
