"""Stages 2 and 3, templating and tokenization: records become token ids with loss labels.

A record is rendered to text plus the character spans that carry loss (assistant turns, the response,
or all of a text). The text is tokenized in batches by the fast tokenizer with offset mapping, and a
token carries loss when it overlaps a supervised span. Working on characters rather than token prefixes
keeps the masking right when the tokenizer merges characters across a span boundary.

With ``template: format`` the text before ``{response}`` is the prompt; ``{system}`` in the format string
is replaced by data.system_prompt (or nothing). A chat template gets data.system_prompt as a leading system
message unless the conversation has its own.

Assistant spans in a chat template are found by rendering the conversation up to each assistant turn with
``add_generation_prompt=True`` (where the answer starts) and up to the end of that turn (where it ends).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .format import IGNORE_INDEX

Span = tuple[int, int]


@dataclass
class Rendered:
    """A templated record: its text, the character spans carrying loss, and how to finish tokenizing it."""

    text: str
    spans: list[Span]
    append_eos: bool


class Templater:
    """Renders records of one record type with the chat template, a format string, or as plain text."""

    def __init__(self, tokenizer, cfg, kind: str):
        self.tok, self.cfg, self.kind = tokenizer, cfg, kind
        self.use_chat = kind != "text" and cfg.template == "chat"
        if self.use_chat and not tokenizer.chat_template:
            raise DataError(f"the tokenizer of model.name_or_path has no chat template, which data.template: chat "
                            f"needs; set data.template: format with a data.format_string such as "
                            f"\"### Question:\\n{{prompt}}\\n\\n### Answer:\\n{{response}}\"")
        if kind == "messages" and not self.use_chat:
            raise DataError("data.record_type messages needs data.template: chat (a format string has no roles)")
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer of model.name_or_path has no EOS token; set one in its "
                            "tokenizer_config.json (eos_token) so the model can learn to stop")
        # Chat templates already place their special tokens (BOS included) in the text.
        self.add_special_tokens = not self.use_chat
        self.backend = tokenizer.backend_tokenizer
        self.backend.no_truncation()  # over-length rows are handled by data.excess_length, not cut silently
        self.backend.no_padding()

    def render(self, record: dict) -> Rendered:
        """Template one cleaned record."""
        if self.kind == "text":
            return Rendered(record["text"], [(0, len(record["text"]))], append_eos=True)
        if not self.use_chat:
            return self._render_format(record["prompt"], record["response"])
        messages = record["messages"] if self.kind == "messages" else [
            {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        if self.cfg.system_prompt and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": self.cfg.system_prompt}] + list(messages)
        return self._render_chat(messages)

    def _render_format(self, prompt: str, response: str) -> Rendered:
        before, _, after = self.cfg.format_string.partition("{response}")
        system = self.cfg.system_prompt or ""
        head = before.replace("{system}", system).replace("{prompt}", prompt)
        text = head + response + after.replace("{system}", system).replace("{prompt}", prompt)
        start = 0 if self.cfg.train_on_prompt else len(head)
        return Rendered(text, [(start, len(text))], append_eos=True)

    def _chat(self, messages, generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _render_chat(self, messages: list[dict]) -> Rendered:
        full = self._chat(messages)
        spans: list[Span] = []
        search_from = 0
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            span = self._assistant_span(messages, i, full, search_from)
            spans.append(span)
            search_from = span[1]
        spans = [self._end_at_eos(full, span) for span in spans]
        ends_with_eos = bool(spans) and full.endswith(self.tok.eos_token, 0, spans[-1][1])
        if self.cfg.train_on_prompt and spans:
            spans = [(0, len(full))]
        # EOS is appended only where an answer ends the document and the template did not end it with EOS.
        append_eos = bool(spans) and not ends_with_eos and messages[-1]["role"] == "assistant"
        return Rendered(full, spans, append_eos=append_eos)

    def _end_at_eos(self, full: str, span: Span) -> Span:
        """Cut the whitespace a template writes after a turn's EOS: predicting it after EOS is noise."""
        start, end = span
        eos = self.tok.eos_token
        k = full.rfind(eos, start, end)
        if k >= 0 and not full[k + len(eos):end].strip():
            return start, k + len(eos)
        return span

    def _assistant_span(self, messages, i: int, full: str, search_from: int) -> Span:
        upto = full if i == len(messages) - 1 else self._chat(messages[: i + 1])
        if i > 0:
            head = self._chat(messages[:i], generation_prompt=True)
            if full.startswith(head) and full.startswith(upto) and search_from <= len(head) < len(upto):
                return len(head), len(upto)
        # Templates that rewrite earlier turns are not prefix-consistent: fall back to the content's position.
        content = messages[i]["content"]
        start = full.find(content, search_from)
        if start < 0:
            raise DataError(f"the chat template does not reproduce assistant turn {i} verbatim, so its loss span "
                            f"cannot be found; use data.template: format")
        end = start + len(content)
        eos = self.tok.eos_token
        if full.startswith(eos, end):
            end += len(eos)
        return start, end

    def overhead_tokens(self) -> int:
        """Tokens the template adds around an empty record (plus the EOS it appends), for the seq_len check."""
        empty = {"text": {"text": ""}, "prompt_response": {"prompt": "", "response": ""},
                 "messages": {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}}
        rendered = self.render(empty[self.kind])
        ids = self.tok(rendered.text, add_special_tokens=self.add_special_tokens)["input_ids"]
        return len(ids) + int(rendered.append_eos)


def labels_from_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[Span]) -> np.ndarray:
    """Labels aligned with ids: the id where the token overlaps a supervised span, else IGNORE_INDEX."""
    ids_arr = np.asarray(ids, dtype=np.int32)
    if not len(ids_arr):
        return ids_arr
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids_arr), dtype=bool)
    for start, end in spans:
        mask |= (off[:, 0] < end) & (off[:, 1] > start)
    return np.where(mask, ids_arr, IGNORE_INDEX).astype(np.int32)


def finish_document(ids: np.ndarray, labels: np.ndarray, *, eos_id: int | None, seq_len: int,
                    excess_length: str, where: str) -> dict:
    """Append EOS (when ``eos_id`` is given), apply the first-token rule and the over-length rule.

    Returns one output row of :func:`tokenize_batch`; ``where`` names the row for an error.
    """
    if eos_id is not None:
        ids, labels = np.append(ids, np.int32(eos_id)), np.append(labels, np.int32(eos_id))
    labels[:1] = IGNORE_INDEX  # FORMAT.md: a document's first token is never a target
    raw_len, drop, truncated = len(ids), "", False
    if raw_len > seq_len:
        if excess_length == "error":
            raise DataError(f"{where}: {raw_len} tokens after templating, more than data.seq_len {seq_len}; "
                            f"raise data.seq_len, shorten the row, or set data.excess_length: truncate or drop")
        if excess_length == "drop":
            drop = "too_long"
        else:
            ids, labels, truncated = ids[:seq_len], labels[:seq_len], True
    n_supervised = int((labels != IGNORE_INDEX).sum())
    if not drop and n_supervised == 0:
        drop = "no_supervised_tokens"
    return {"input_ids": ids, "labels": labels, "n_tokens_raw": raw_len, "n_tokens": len(ids),
            "n_supervised": n_supervised, "truncated": truncated, "_drop2": drop}


def tokenize_batch(batch: dict, *, templater: Templater, seq_len: int, excess_length: str, where) -> dict:
    """Template and tokenize a batch of cleaned records; apply the over-length rule and the label rules.

    ``where(src_id, row)`` names a source row for an error message. Output columns: input_ids, labels,
    n_tokens_raw (before truncation), n_tokens, n_supervised, truncated, _drop2 (a drop reason or "").
    """
    columns = [c for c in batch if not c.startswith("_")]
    rendered = [templater.render({c: batch[c][i] for c in columns}) for i in range(len(batch["_src"]))]
    # The Rust tokenizer directly: transformers' wrapper would convert every encoding to Python lists first.
    enc = templater.backend.encode_batch([r.text for r in rendered], add_special_tokens=templater.add_special_tokens)
    out = {k: [] for k in ("input_ids", "labels", "n_tokens_raw", "n_tokens", "n_supervised", "truncated", "_drop2")}
    for i, r in enumerate(rendered):
        doc = finish_document(
            np.asarray(enc[i].ids, dtype=np.int32), labels_from_spans(enc[i].ids, enc[i].offsets, r.spans),
            eos_id=templater.tok.eos_token_id if r.append_eos else None, seq_len=seq_len,
            excess_length=excess_length, where=where(batch["_src"][i], batch["_row"][i]))
        for key, value in doc.items():
            out[key].append(value)
    return out


def token_features():
    """Arrow features of tokenize_batch's output."""
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")),
                     "n_tokens_raw": Value("int32"), "n_tokens": Value("int32"), "n_supervised": Value("int32"),
                     "truncated": Value("bool"), "_drop2": Value("string")})
