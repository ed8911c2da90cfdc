"""Stages 2 and 3, templating and tokenization: records become token ids with loss labels.

A record is rendered to text plus the character spans that carry loss (assistant turns, the response,
or all of a text). The text is tokenized in batches by the fast tokenizer with offset mapping, and a
token carries loss when it overlaps a supervised span. Working on characters rather than token prefixes
keeps the masking right when the tokenizer merges characters across a span boundary. Special-token
strings inside data are tokenized as text (special.py).

With ``template: format`` the text before ``{response}`` is the prompt; ``{system}`` in the format string
is replaced by data.system_prompt (or nothing). A chat template (data.chat_template, else the
tokenizer's) gets data.system_prompt as a leading system message unless the conversation has its own.

Assistant spans in a chat template come from its ``{% generation %}`` blocks when it has them. Otherwise
they are found by incremental rendering: the conversation up to an assistant turn with
``add_generation_prompt=True`` must be a prefix of the whole rendering (the answer starts there), and the
turn up to its end-of-turn token must render the same with or without the turns after it. A template
that breaks either rule (one that rewrites earlier turns, say) is refused with an error naming it and an
override, never masked by guesswork. A span ends with the turn's end-of-turn token (the special token the
template writes right after an answer); what the template writes after that is not trained on.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .format import IGNORE_INDEX
from .special import SpecialText

Span = tuple[int, int]
BUILTIN_DIR = Path(__file__).parent / "chat_templates"
GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
_PROBE = "Zq7 probe answer"
# A marker token of each family's chat format, and the built-in template that renders it.
_FAMILY_MARKERS = [("<|start_header_id|>", "llama3"), ("<|im_start|>", "qwen2.5"), ("<start_of_turn>", "gemma"),
                   ("[INST]", "mistral"), ("<|assistant|>", "phi3")]


def builtin_templates() -> list[str]:
    """Names of the built-in chat templates (data.chat_template: NAME)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jinja"))


def resolve_chat_template(tokenizer, override: str | None) -> tuple[str | None, str]:
    """(template text, how to name it in messages) for data.chat_template, else the tokenizer's own."""
    if not override:
        tpl = tokenizer.chat_template
        if isinstance(tpl, dict):
            tpl = tpl.get("default")
        return tpl, "the tokenizer's chat template (model.name_or_path)"
    path = Path(override)
    if path.is_file():
        return path.read_text(encoding="utf-8"), f"data.chat_template {override}"
    if (BUILTIN_DIR / f"{override}.jinja").is_file():
        return (BUILTIN_DIR / f"{override}.jinja").read_text(encoding="utf-8"), f"built-in chat template {override}"
    raise DataError(f"data.chat_template {override!r} is neither a file nor a built-in template; built-ins: "
                    f"{', '.join(builtin_templates())}")


def suggested_template(tokenizer) -> str:
    """The built-in template matching a tokenizer's special tokens (chatml when none matches)."""
    vocab = tokenizer.get_vocab()
    return next((name for marker, name in _FAMILY_MARKERS if marker in vocab), "chatml")


@dataclass
class Rendered:
    """A templated record: its text, the character spans carrying loss, how to finish tokenizing it, and
    the spans holding data that contained special-token strings (None when there were none)."""

    text: str
    spans: list[Span]
    append_eos: bool
    data_spans: list[Span] | None = None


class Templater:
    """Renders canonical records (records.py) with the chat template, a format string, or as plain text."""

    def __init__(self, tokenizer, cfg, kinds: set[str]):
        self.tok, self.cfg = tokenizer, cfg
        self.use_chat = cfg.template == "chat" and kinds != {"text"}
        self.template, self.template_name = resolve_chat_template(tokenizer, cfg.chat_template)
        if self.use_chat and not self.template:
            raise DataError(f"the tokenizer of model.name_or_path has no chat template, which data.template: chat "
                            f"needs; set data.chat_template (built-ins: {', '.join(builtin_templates())}) or "
                            f"data.template: format with a data.format_string such as "
                            f"\"### Question:\\n{{prompt}}\\n\\n### Answer:\\n{{response}}\"")
        multi_turn = kinds & {"messages", "sharegpt"}
        if multi_turn and cfg.template != "chat":
            raise DataError(f"data.record_type {sorted(multi_turn)[0]} needs data.template: chat (a format string "
                            f"has no roles)")
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer of model.name_or_path has no EOS token; set one in its "
                            "tokenizer_config.json (eos_token) so the model can learn to stop")
        self.generation = bool(self.use_chat and GENERATION_BLOCK.search(self.template))
        self.special = SpecialText(tokenizer)
        self.template_kwargs = dict(tokenizer.special_tokens_map)
        self.end_of_turn = self._find_end_of_turn() if self.use_chat else None
        # Chat templates already place their special tokens (BOS included) in the text.
        self.add_special_tokens = not self.use_chat
        self.backend = tokenizer.backend_tokenizer
        self.backend.no_truncation()  # over-length rows are handled by data.excess_length, not cut silently
        self.backend.no_padding()

    def render(self, record: dict) -> Rendered:
        """Template one canonical record; special-token strings in its data are kept as text."""
        escaped, hit = record, False
        if self.special.find(_all_text(record)):  # one search over the row's text; rarely true
            escaped, hit = self.special.escape({k: record[k] for k in ("messages", "tools", "text")})
        if not escaped["messages"]:
            text = escaped["text"]
            rendered = Rendered(text, [(0, len(text))], append_eos=True)
        elif not self.use_chat:
            rendered = self._render_format(escaped["messages"])
        else:
            rendered = self._render_chat(escaped)
        if hit:
            rendered.text, rendered.data_spans = self.special.unescape(rendered.text)
        return rendered

    def _render_format(self, turns: list[dict]) -> Rendered:
        prompt = "\n\n".join(t["content"] for t in turns if t["role"] == "user")
        response = "".join(t["content"] for t in turns if t["role"] == "assistant")
        system = next((t["content"] for t in turns if t["role"] == "system"), self.cfg.system_prompt or "")
        before, _, after = self.cfg.format_string.partition("{response}")
        head = before.replace("{system}", system).replace("{prompt}", prompt)
        text = head + response + after.replace("{system}", system).replace("{prompt}", prompt)
        start = 0 if self.cfg.train_on_prompt else len(head)
        return Rendered(text, [(start, len(text))], append_eos=True)

    def template_messages(self, record: dict) -> list[dict]:
        """The conversation as chat templates read it (tool calls as objects, empty fields left out)."""
        messages = []
        for turn in record["messages"]:
            msg = {"role": turn["role"], "content": turn["content"]}
            if turn["tool_calls"]:
                msg["tool_calls"] = json.loads(turn["tool_calls"])
            for key in ("name", "tool_call_id"):
                if turn.get(key):
                    msg[key] = turn[key]
            messages.append(msg)
        if self.cfg.system_prompt and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": self.cfg.system_prompt}] + messages
        return messages

    def _chat(self, messages, tools=None, generation_prompt: bool = False, assistant_mask: bool = False):
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, indices = render_jinja_template(
                conversations=[messages], tools=tools, chat_template=self.template,
                return_assistant_tokens_mask=assistant_mask, add_generation_prompt=generation_prompt,
                **self.template_kwargs)
        except Exception as exc:  # noqa: BLE001 - a template's own raise_exception or a Jinja error
            raise DataError(f"{self.template_name} failed to render a conversation ({type(exc).__name__}: "
                            f"{exc}); fix the row or set data.chat_template to a template that accepts it") from None
        return (texts[0], indices[0]) if assistant_mask else texts[0]

    def _trained_turns(self, record: dict, messages: list[dict]) -> list[bool]:
        """For each assistant message of ``messages``: whether it carries loss."""
        flags = [t["train"] for t in record["messages"] if t["role"] == "assistant"]
        if self.cfg.train_on == "last_turn" and flags:
            flags = [False] * (len(flags) - 1) + flags[-1:]
        return flags

    def _render_chat(self, record: dict) -> Rendered:
        messages = self.template_messages(record)
        tools = json.loads(record["tools"]) if record["tools"] else None
        full, turn_spans = self._generation_spans(messages, tools) if self.generation else \
            self._incremental_spans(messages, tools)
        spans = [span for span, train in zip(turn_spans, self._trained_turns(record, messages)) if train]
        ends_with_special = bool(spans) and self._ends_with_special(full, spans[-1])
        if self.cfg.train_on_prompt and spans:
            spans = [(0, len(full))]
        # EOS is appended only where an answer ends the document and the template did not end it with a
        # special token (its end of turn).
        append_eos = bool(spans) and not ends_with_special and messages[-1]["role"] == "assistant"
        return Rendered(full, spans, append_eos=append_eos)

    def _ends_with_special(self, text: str, span: Span) -> bool:
        piece = text[span[0]:span[1]]
        return any(piece.endswith(s) for s in self.special.tokens)

    def _refuse(self, reason: str) -> DataError:
        return DataError(f"{self.template_name} cannot be masked exactly: {reason}. Set data.chat_template to a "
                         f"template whose assistant turns are wrapped in {{% generation %}}...{{% endgeneration %}}, "
                         f"or to the built-in {suggested_template(self.tok)!r} (built-ins: "
                         f"{', '.join(builtin_templates())})")

    def _generation_spans(self, messages, tools) -> tuple[str, list[Span]]:
        full, blocks = self._chat(messages, tools, assistant_mask=True)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(blocks) != len(assistant):
            raise self._refuse(f"it has {len(blocks)} {{% generation %}} blocks for {len(assistant)} assistant turns")
        spans = []
        for i, (start, end) in zip(assistant, blocks):
            if self.end_of_turn and full.startswith(self.end_of_turn, end):
                end += len(self.end_of_turn)  # a block that stops short of the end-of-turn token
            span = self._cut_at_end_of_turn(full, start, end)
            self._check_content(full, span, messages[i], i)
            spans.append(span)
        return full, spans

    def _incremental_spans(self, messages, tools) -> tuple[str, list[Span]]:
        full = self._chat(messages, tools)
        spans, search_from = [], 0
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            head = self._chat(messages[:i], tools, generation_prompt=True) if i else ""
            if not full.startswith(head) or len(head) < search_from:
                raise self._refuse(f"the conversation rendered up to assistant turn {i} with add_generation_prompt "
                                   f"is not a prefix of the whole conversation (the template rewrites earlier turns "
                                   f"or the generation prompt)")
            upto = full if i == len(messages) - 1 else self._chat(messages[: i + 1], tools)
            same = len(upto) if full.startswith(upto) else len(_common_prefix(upto, full))
            span = self._cut_at_end_of_turn(full, len(head), len(upto))
            if span[1] > same:
                raise self._refuse(f"assistant turn {i} renders differently when later turns follow it")
            self._check_content(full, span, msg, i)
            spans.append(span)
            search_from = span[1]
        return full, spans

    def _check_content(self, full: str, span: Span, msg: dict, i: int) -> None:
        if msg["content"] and msg["content"].strip() not in full[span[0]:span[1]]:
            raise self._refuse(f"the text found for assistant turn {i} does not contain its content")

    def _cut_at_end_of_turn(self, full: str, start: int, end: int) -> Span:
        """The span up to the turn's end-of-turn token (inclusive); without one, minus trailing whitespace
        after the last special token."""
        if self.end_of_turn:
            k = full.find(self.end_of_turn, start, end)
            if k >= 0:
                return start, k + len(self.end_of_turn)
        last = None
        for m in (self.special.pattern.finditer(full, start, end) if self.special.pattern else ()):
            last = m
        if last is not None and not full[last.end():end].strip():
            return start, last.end()
        return start, end

    def _find_end_of_turn(self) -> str | None:
        """The special token a template writes right after an answer (None when it writes none)."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            text = self._chat(probe)
        except DataError:
            return None
        at = text.find(_PROBE)
        m = self.special.pattern.search(text, at + len(_PROBE)) if at >= 0 and self.special.pattern else None
        return m.group() if m and not text[at + len(_PROBE):m.start()].strip() else None

    def overhead_tokens(self, kinds: set[str]) -> int:
        """Tokens the template adds around an empty record (plus the EOS it appends), for the seq_len check."""
        turn = {"content": "", "tool_calls": "", "name": "", "tool_call_id": "", "train": True}
        empty_chat = {"messages": [{**turn, "role": "user"}, {**turn, "role": "assistant"}], "tools": "", "text": ""}
        records = ([empty_chat] if kinds != {"text"} else []) + \
            ([{"messages": [], "tools": "", "text": ""}] if "text" in kinds else [])
        out = 0
        for record in records:
            rendered = self.render(record)
            add = self.add_special_tokens or not record["messages"]
            ids = self.tok(rendered.text, add_special_tokens=add)["input_ids"]
            out = max(out, len(ids) + int(rendered.append_eos))
        return out

    def encode_batch(self, rendered: list[Rendered], text_rows: list[bool]) -> list[tuple[list[int], list[Span]]]:
        """Token ids and offsets of rendered documents; the batched encode unless data held special strings."""
        plain = [i for i, r in enumerate(rendered) if r.data_spans is None]
        out: list = [None] * len(rendered)
        for add in (True, False):
            group = [i for i in plain if (self.add_special_tokens or text_rows[i]) == add]
            if not group:
                continue
            for i, enc in zip(group, self.backend.encode_batch([rendered[i].text for i in group],
                                                              add_special_tokens=add)):
                out[i] = (enc.ids, enc.offsets)
        for i, r in enumerate(rendered):
            if r.data_spans is not None:
                out[i] = self.special.encode(r.text, r.data_spans, self.add_special_tokens or text_rows[i])
        return out


def _all_text(record: dict) -> str:
    parts = [record["text"], record["tools"]]
    for turn in record["messages"]:
        parts.extend((turn["content"], turn["tool_calls"], turn["name"], turn["tool_call_id"]))
    return "\n".join(parts)


def _common_prefix(a: str, b: str) -> str:
    n = min(len(a), len(b))
    k = next((j for j in range(n) if a[j] != b[j]), n)
    return a[:k]


TOKEN_COLUMNS = ("input_ids", "labels", "n_tokens_raw", "n_tokens", "n_supervised", "truncated", "special_text",
                 "_drop2")  # tokenize_batch's output, in token_features' order


def _flat_offsets(offsets_per_doc, total: int) -> np.ndarray:
    """[total, 2] int64 character offsets of every token of the documents, in order."""
    # fromiter over the flattened pairs: np.asarray on a list of tuples costs ~10x more per token.
    pairs = itertools.chain.from_iterable(itertools.chain.from_iterable(offsets_per_doc))
    return np.fromiter(pairs, dtype=np.int64, count=2 * total).reshape(-1, 2)


def supervised_mask(offsets: np.ndarray, lens: np.ndarray, spans_per_doc: list[list[Span]]) -> np.ndarray:
    """Over the concatenated tokens of a batch of documents (``lens`` tokens each, character ``offsets`` into
    their own text): True where a token overlaps one of its document's supervised spans."""
    begin = np.cumsum(lens) - lens
    count = np.fromiter((len(spans) for spans in spans_per_doc), dtype=np.int64, count=len(spans_per_doc))
    mask = np.zeros(len(offsets), dtype=bool)
    # The j-th span of every document that has one, against all of that document's tokens at once: the work
    # of the per-token overlap test, with memory bounded by the batch's tokens.
    for j in range(int(count.max(initial=0))):
        docs = np.flatnonzero(count > j)
        span = np.array([spans_per_doc[d][j] for d in docs], dtype=np.int64).reshape(-1, 2)
        reps = lens[docs]
        token = np.arange(int(reps.sum()), dtype=np.int64) + np.repeat(begin[docs] - (np.cumsum(reps) - reps), reps)
        hit = (offsets[token, 0] < np.repeat(span[:, 1], reps)) & (offsets[token, 1] > np.repeat(span[:, 0], reps))
        mask[token[hit]] = True
    return mask


class Ragged(Sequence):
    """Documents' token arrays as one flat array and each document's end offset: reads like a list of arrays
    (views), and :func:`token_table` writes it to Arrow as it is (splitting a batch into per-document arrays
    and concatenating them again cost a third of finishing it)."""

    def __init__(self, flat: np.ndarray, ends: np.ndarray):
        self.flat, self.ends = flat, ends

    @classmethod
    def of(cls, arrays) -> "Ragged":
        """The documents of a list of int arrays, copied into one."""
        lens = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays).astype(np.int32) if len(arrays) else np.zeros(0, dtype=np.int32)
        return cls(flat, np.cumsum(lens))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.flat[(self.ends[i - 1] if i else 0):self.ends[i]]


def finish_batch(encoded: list, spans_per_doc: list[list[Span]], append_eos: np.ndarray, *, eos_id: int,
                 seq_len: int, excess_length: str, where) -> dict:
    """Labels from the supervised spans, then per document: EOS appended where ``append_eos``, the
    first-token rule, the over-length rule and the no-supervised-token drop, on the batch's tokens at once.

    ``encoded`` holds (ids, offsets) per document; returns :func:`tokenize_batch`'s columns, a list per
    column (input_ids and labels as :class:`Ragged`); ``where(i)`` names document i for an error (called only
    then).
    """
    n = len(encoded)
    if not n:
        return {k: [] for k in TOKEN_COLUMNS if k != "special_text"}
    lens = np.fromiter((len(ids) for ids, _ in encoded), dtype=np.int64, count=n)
    total = int(lens.sum())
    ids = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in encoded), dtype=np.int32, count=total)
    mask = supervised_mask(_flat_offsets((offsets for _, offsets in encoded), total), lens, spans_per_doc)
    labels = np.where(mask, ids, IGNORE_INDEX).astype(np.int32)
    if append_eos.any():  # after each such document's last token (np.insert keeps the order of equal indices)
        at = np.cumsum(lens)[append_eos]
        ids, labels = np.insert(ids, at, np.int32(eos_id)), np.insert(labels, at, np.int32(eos_id))
        lens = lens + append_eos
    begin = np.cumsum(lens) - lens
    labels[begin[lens > 0]] = IGNORE_INDEX  # FORMAT.md: a document's first token is never a target
    raw_len = n_tokens = lens
    over = lens > seq_len
    drop = np.full(n, "", dtype=object)
    if over.any():
        if excess_length == "error":
            i = int(np.flatnonzero(over)[0])
            raise DataError(f"{where(i)}: {int(raw_len[i])} tokens after templating, more than data.seq_len "
                            f"{seq_len}; raise data.seq_len, shorten the row, or set data.excess_length: truncate "
                            f"or drop")
        if excess_length == "drop":
            drop[over] = "too_long"
        else:  # truncate: every document's tokens past seq_len go
            keep = np.arange(int(lens.sum())) - np.repeat(begin, lens) < seq_len
            ids, labels, n_tokens = ids[keep], labels[keep], np.minimum(lens, seq_len)
    ends = np.cumsum(n_tokens)
    supervised = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])
    n_supervised = supervised[ends] - supervised[ends - n_tokens]
    drop[(drop == "") & (n_supervised == 0)] = "no_supervised_tokens"
    return {"input_ids": Ragged(ids, ends), "labels": Ragged(labels, ends),
            "n_tokens_raw": raw_len.tolist(), "n_tokens": n_tokens.tolist(), "n_supervised": n_supervised.tolist(),
            "truncated": (over & (excess_length == "truncate")).tolist(), "_drop2": drop.tolist()}


def tokenize_batch(batch: dict, *, templater: Templater, seq_len: int, excess_length: str, where) -> dict:
    """Template and tokenize a batch of canonical records; apply the over-length rule and the label rules.

    ``where(src_id, row)`` names a source row for an error message. Output columns: input_ids, labels,
    n_tokens_raw (before truncation), n_tokens, n_supervised, truncated, special_text (the row's data held a
    special-token string), _drop2 (a drop reason or "").
    """
    # Each column looked up once: a lookup in datasets' lazy batch costs more than a list index.
    messages, tools, text, src, row = (batch[c] for c in ("messages", "tools", "text", "_src", "_row"))
    rendered = []
    for i in range(len(src)):
        try:
            rendered.append(templater.render({"messages": messages[i], "tools": tools[i], "text": text[i]}))
        except DataError as exc:
            raise DataError(f"{where(src[i], row[i])}: {exc}") from None
    encoded = templater.encode_batch(rendered, [not m for m in messages])
    append_eos = np.fromiter((r.append_eos for r in rendered), dtype=bool, count=len(rendered))
    out = finish_batch(encoded, [r.spans for r in rendered], append_eos, eos_id=templater.tok.eos_token_id,
                       seq_len=seq_len, excess_length=excess_length, where=lambda i: where(src[i], row[i]))
    out["special_text"] = [r.data_spans is not None for r in rendered]
    return {k: out[k] for k in TOKEN_COLUMNS}


SKIPPED = "skipped"  # _drop2 of a row that an earlier stage dropped (tokenize_kept leaves it empty)


def tokenize_kept(batch: dict, indices: list[int], *, keep: np.ndarray, **kwargs) -> dict:
    """:func:`tokenize_batch` over the rows of ``batch`` whose row index ``keep`` marks; every other row (one
    an earlier stage dropped) becomes an empty row with _drop2 SKIPPED, so the output stays row for row
    with the input. ``kwargs`` are tokenize_batch's."""
    picked = np.flatnonzero(keep[np.asarray(indices, dtype=np.int64)]).tolist()
    if len(picked) == len(indices):
        return tokenize_batch(batch, **kwargs)
    empty = {"input_ids": np.zeros(0, dtype=np.int32), "labels": np.zeros(0, dtype=np.int32), "n_tokens_raw": 0,
             "n_tokens": 0, "n_supervised": 0, "truncated": False, "special_text": False, "_drop2": SKIPPED}
    out = {k: [empty[k]] * len(indices) for k in TOKEN_COLUMNS}
    if picked:
        done = tokenize_batch({k: [v[i] for i in picked] for k, v in batch.items()}, **kwargs)
        for key, values in done.items():
            for i, value in zip(picked, values):
                out[key][i] = value
    return out


def token_table(out: dict):
    """tokenize_batch's (or tokenize_kept's) output as an Arrow table of :func:`token_features`' schema, each
    list column built from one concatenated array (datasets converted every document's array separately)."""
    import pyarrow as pa

    schema = token_features().arrow_schema
    columns = []
    for field in schema:
        values = out[field.name]
        if pa.types.is_list(field.type):
            values = values if isinstance(values, Ragged) else Ragged.of(values)
            offsets = np.concatenate([[0], values.ends]).astype(np.int32)
            flat = pa.array(values.flat.astype(np.int32, copy=False))
            columns.append(pa.ListArray.from_arrays(pa.array(offsets), flat).cast(field.type))
        else:
            columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def token_features():
    """Arrow features of tokenize_batch's output."""
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")),
                     "n_tokens_raw": Value("int32"), "n_tokens": Value("int32"), "n_supervised": Value("int32"),
                     "truncated": Value("bool"), "special_text": Value("bool"), "_drop2": Value("string")})
