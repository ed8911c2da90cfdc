"""Stage 1, cleaning: text kept as written (NFC, unified line endings), records of every shape made canonical,
bad rows and empty fields marked, content hashes.

Runs as a batched ``datasets.map`` over one source at a time and emits the canonical columns (records.py:
messages, tools, text) plus bookkeeping columns that later stages use: ``_drop`` (a drop reason, "" to
keep), ``_why`` (for a bad row, its reason and detail), ``_hash`` (hash of the content under
:func:`dedup_key`, for dedup and the split: the stored text is never changed by that key), ``_phash`` (hash
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

from .readers import Source
from .records import BadRow, Columns, to_record

PREFIX_CHARS = 200  # prompts sharing their first 200 characters share a context (the redundant-context report)
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")
_NOT_WORD = re.compile(r"[\W_]+")
# ASCII text, lowercased: letters and digits kept, every other byte a space (what _NOT_WORD matches there).
_ASCII_NOT_WORD = bytes(c if chr(c).isascii() and chr(c).isalnum() else ord(" ") for c in range(256))
BAD_ROW_EXAMPLES = 5  # bad rows named (file:line) in the report, per source


def normalize_text(text: str) -> str:
    """Text kept as written: Unicode NFC (canonical composition, never compatibility folding) and unified
    line endings; nothing else changes."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.isascii() else unicodedata.normalize("NFC", text)


def strip_whitespace(text: str) -> str:
    """Opt-in cleaning (data.strip_whitespace): no trailing spaces on a line, no blank ends; indentation kept."""
    return _TRAILING_SPACE.sub("\n", text).strip()


def collapse_blank_lines(text: str) -> str:
    """Opt-in cleaning (data.collapse_blank_lines): at most one blank line in a row."""
    return _MANY_BLANK_LINES.sub("\n\n", text)


def cleaning_steps(cfg) -> list[str]:
    """The opt-in cleaning steps a DataConfig turns on, in the order they run (named in the report)."""
    return [name for name in ("strip_whitespace", "collapse_blank_lines") if getattr(cfg, name)]


class Normalizer:
    """normalize_text followed by the opt-in steps (picklable, for datasets' worker processes)."""

    def __init__(self, steps: list[str]):
        self.steps = [{"strip_whitespace": strip_whitespace, "collapse_blank_lines": collapse_blank_lines}[s]
                      for s in steps]

    def __call__(self, text: str) -> str:
        text = normalize_text(text)
        for step in self.steps:
            text = step(text)
        return text


def dedup_key(text: str) -> str:
    """The key exact deduplication compares (the stored text is never changed by it): compatibility
    folding (NFKC), no trailing spaces, at most one blank line, stripped ends."""
    text = unicodedata.normalize("NFKC", text) if not text.isascii() else text
    # The regular expressions only when they can match (most texts have nothing to change): a tenth of cleaning.
    if " \n" in text or "\t\n" in text:
        text = _TRAILING_SPACE.sub("\n", text)
    text = text.strip()
    return _MANY_BLANK_LINES.sub("\n\n", text) if "\n\n\n" in text else text


def loose_key(text: str) -> str:
    """Text with compatibility forms folded and case, spacing and punctuation removed: rows equal under it
    are near-duplicates."""
    if text.isascii():
        # A byte table and split() do what the expression does, ~4x faster (near-dup hashing is a third of
        # cleaning): runs of other characters become one space, none at the ends.
        return " ".join(text.lower().encode("ascii").translate(_ASCII_NOT_WORD).decode("ascii").split())
    return _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _content_texts(record: dict) -> list[str]:
    if not record["messages"]:
        return [record["text"]]
    return [m["content"] + m["tool_calls"] for m in record["messages"]]


# The text of json.dumps(obj, ensure_ascii=False, sort_keys=True). JSONEncoder.encode builds a new C encoder
# (and a dict for cycle checks) on every call; hashing three values per row, that was a fifth of the hash
# cost, so the C encoder is built once where the interpreter has one (records come from JSON and Arrow:
# they hold no cycles to check for).
_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True)
_C_JSON = json.encoder.c_make_encoder and json.encoder.c_make_encoder(
    None, _JSON.default, json.encoder.encode_basestring, None, ": ", ", ", True, False, True)


def _json_text(obj) -> str:
    if isinstance(obj, str):
        return json.encoder.encode_basestring(obj)
    return "".join(_C_JSON(obj, 0)) if _C_JSON else _JSON.encode(obj)


def hash64(obj) -> int:
    """A stable signed 64-bit hash of a JSON-serialisable value (sha256 prefix)."""
    digest = hashlib.sha256(_json_text(obj).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


CANONICAL_COLUMNS = ["messages", "tools", "text"]


def prompt_of(record: dict) -> str:
    """The context a record's answer is conditioned on ("" for text): the turns before the first assistant turn."""
    parts = []
    for msg in record["messages"]:
        if msg["role"] == "assistant":
            break
        parts.append(f"{msg['role']}: {msg['content']}")
    return "\n".join(parts)


def _is_empty(record: dict) -> bool:
    if not record["messages"]:
        return not record["text"].strip()
    return any(not m["content"].strip() and not m["tool_calls"] for m in record["messages"])


def _dedup_hash(record: dict) -> int:
    if not record["messages"]:
        return hash64(["text", dedup_key(record["text"])])
    return hash64([[m["role"], dedup_key(m["content"]), m["tool_calls"], m["train"]] for m in record["messages"]]
                  + [record["tools"]])


def _empty_record() -> dict:
    return {"messages": [], "tools": "", "text": ""}


def clean_batch(batch: dict, indices: list[int], *, columns: Columns, src: Source, src_id: int,
                normalize: Normalizer) -> dict:
    """Clean one batch of raw rows of one source into canonical records plus bookkeeping columns."""
    out = {c: [] for c in CANONICAL_COLUMNS}
    out.update(_drop=[], _why=[], _hash=[], _phash=[], _pprefix=[], _nhash=[], _src=[], _row=[])
    # Each column looked up once: a lookup in datasets' lazy batch costs more than a list index.
    given = {column: batch[column] for _, column in columns.names.values() if column in batch}
    for pos, row_index in enumerate(indices):
        row = {column: values[pos] for column, values in given.items()}
        try:
            record, drop, why = to_record(row, columns, normalize), "", ""
        except BadRow as bad:
            record, drop, why = _empty_record(), "bad_row", f"{bad.reason}: {bad.detail}"
        if not drop and _is_empty(record):
            drop = "empty_field"
        prompt = prompt_of(record)
        for name in CANONICAL_COLUMNS:
            out[name].append(record[name])
        out["_drop"].append(drop)
        out["_why"].append(why)
        out["_hash"].append(_dedup_hash(record))
        phash = hash64(prompt) if prompt else 0
        out["_phash"].append(phash)
        # A prompt within the prefix length is its own prefix: same hash, not hashed twice.
        out["_pprefix"].append(hash64(prompt[:PREFIX_CHARS]) if len(prompt) > PREFIX_CHARS else phash)
        out["_nhash"].append(hash64([loose_key(t) for t in _content_texts(record)]))
        out["_src"].append(src_id)
        out["_row"].append(row_index)
    return out


def clean_features():
    """Arrow features of the cleaned columns (fixed, so sources of different shapes concatenate)."""
    from datasets import Features, List, Value

    turn = {"role": Value("string"), "content": Value("string"), "tool_calls": Value("string"),
            "name": Value("string"), "tool_call_id": Value("string"), "train": Value("bool")}
    return Features({"messages": List(turn), "tools": Value("string"), "text": Value("string"),
                     "_drop": Value("string"), "_why": Value("string"), "_hash": Value("int64"),
                     "_phash": Value("int64"), "_pprefix": Value("int64"), "_nhash": Value("int64"),
                     "_src": Value("int32"), "_row": Value("int64")})


def first_occurrences(hashes: np.ndarray) -> np.ndarray:
    """Boolean mask, True at the first occurrence of each hash (exact deduplication, order kept)."""
    # One stable sort (equal hashes keep row order, so a run's first entry is the first occurrence): 16
    # bytes a row beside the input at most, where np.unique(return_index=True) held a copy, its sort order, the
    # sorted values and both outputs (~40).
    order = np.argsort(hashes, kind="stable")
    ranked = hashes[order]
    starts = np.empty(len(hashes), dtype=bool)
    starts[:1] = True
    np.not_equal(ranked[1:], ranked[:-1], out=starts[1:])
    del ranked
    keep = np.empty(len(hashes), dtype=bool)
    keep[order] = starts  # order is a permutation: every row is set
    return keep
