"""Special-token safety: special-token strings inside data are ordinary text; only template markup is special.

A tokenizer turns every occurrence of a special token's string (``<|im_end|>``, ``<|eot_id|>``...) into
that token, wherever it comes from. An answer that quotes ``<|im_end|>`` would end its own turn, and one
quoting ``<|im_start|>system`` would inject a role. So before templating, every special-token string in a
record's data is replaced by a same-length run of one private-use character (one character per token,
from U+F0000; data holding those characters is not told apart from them), the template is rendered, and
the runs are turned back into the strings while their positions are remembered. Such a document is
tokenized in pieces: the template's own special tokens map to their ids, and the text between them goes
through a copy of the tokenizer with ``encode_special_tokens`` set, which splits special-token strings into
ordinary tokens. A tokenizer splits its input at special tokens before anything else, so for a document
without such strings the pieces give exactly the ids of a plain encode; prep takes the plain, batched
encode for those (nearly all rows) and the piecewise one only for the rows that need it.
"""

from __future__ import annotations

import re

_MARK_BASE = 0xF0000

Span = tuple[int, int]


class SpecialText:
    """Escapes special-token strings in data and tokenizes documents whose data held them."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        self.tokens = sorted(specials, key=lambda s: (-len(s), s))  # longest first: the regex takes the first arm
        self.ids = {s: tokenizer.convert_tokens_to_ids(s) for s in self.tokens}
        self.pattern = re.compile("|".join(map(re.escape, self.tokens))) if self.tokens else None
        self.marks = {s: chr(_MARK_BASE + i) * len(s) for i, s in enumerate(self.tokens)}
        self.unmarks = {chr(_MARK_BASE + i): s for i, s in enumerate(self.tokens)}
        self.mark_runs = re.compile(f"[{chr(_MARK_BASE)}-{chr(_MARK_BASE + max(len(self.tokens), 1) - 1)}]+")
        self.split_backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.split_backend.encode_special_tokens = True
        self.split_backend.no_truncation()
        self.split_backend.no_padding()
        self.prefix_ids, self.suffix_ids = _post_processor_ids(self.split_backend)

    def __setstate__(self, state: dict) -> None:
        # A pickled Tokenizer (datasets' worker processes, num_proc > 1) forgets encode_special_tokens.
        self.__dict__.update(state)
        self.split_backend.encode_special_tokens = True

    def find(self, text: str):
        """The first special-token string in ``text`` (a match), or None."""
        return self.pattern.search(text) if self.pattern else None

    def escape(self, value):
        """``value`` (a string, or lists/dicts of them) with special-token strings replaced by marks;
        returns (escaped, whether anything was replaced)."""
        if isinstance(value, str):
            if not self.find(value):
                return value, False
            return self.pattern.sub(lambda m: self.marks[m.group()], value), True
        if isinstance(value, dict):
            pairs = {k: self.escape(v) for k, v in value.items()}
            return {k: v for k, (v, _) in pairs.items()}, any(hit for _, hit in pairs.values())
        if isinstance(value, list):
            pairs = [self.escape(v) for v in value]
            return [v for v, _ in pairs], any(hit for _, hit in pairs)
        return value, False

    def unescape(self, text: str) -> tuple[str, list[Span]]:
        """The rendered text with marks turned back into their strings, and the spans that held data."""
        spans = [m.span() for m in self.mark_runs.finditer(text)]
        return self.mark_runs.sub(lambda m: self._unmark_run(m.group()), text), spans

    def _unmark_run(self, run: str) -> str:
        out, pos = [], 0
        while pos < len(run):
            token = self.unmarks[run[pos]]
            out.append(token)
            pos += len(token)
        return "".join(out)

    def encode(self, text: str, data_spans: list[Span], add_special_tokens: bool) -> tuple[list[int], list[Span]]:
        """Token ids and character offsets of ``text``: special tokens only where no data span covers them."""
        ids, offsets, pos = [], [], 0
        for m in (self.pattern.finditer(text) if self.pattern else ()):
            if any(a < m.end() and m.start() < b for a, b in data_spans):
                continue
            self._encode_piece(text, pos, m.start(), ids, offsets)
            ids.append(self.ids[m.group()])
            offsets.append(m.span())
            pos = m.end()
        self._encode_piece(text, pos, len(text), ids, offsets)
        if add_special_tokens:
            ids = self.prefix_ids + ids + self.suffix_ids
            offsets = [(0, 0)] * len(self.prefix_ids) + offsets + [(len(text), len(text))] * len(self.suffix_ids)
        return ids, offsets

    def _encode_piece(self, text: str, start: int, end: int, ids: list, offsets: list) -> None:
        if start >= end:
            return
        enc = self.split_backend.encode(text[start:end], add_special_tokens=False)
        ids.extend(enc.ids)
        offsets.extend((a + start, b + start) for a, b in enc.offsets)


def _post_processor_ids(backend) -> tuple[list[int], list[int]]:
    """The ids a tokenizer's post-processor puts before and after a text (BOS/EOS), found on a probe."""
    bare = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k], full[k + len(bare):]
    return [], []
