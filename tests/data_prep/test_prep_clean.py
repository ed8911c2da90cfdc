import unicodedata
from pathlib import Path

import numpy as np
import pytest

from data_prep.clean import Normalizer, clean_batch, dedup_key, first_occurrences, loose_key, normalize_text
from data_prep.readers import Source
from data_prep.records import Columns

SRC = Source(Path("rows.jsonl"), "json")
PR = Columns("prompt_response", {"prompt": ("data.prompt_column", "q"), "response": ("data.response_column", "a")}, {})
MSG = Columns("messages", {"messages": ("data.messages_column", "m")}, {})
KEEP = Normalizer([])

# Text that compatibility folding (NFKC) or whitespace cleaning would change, and must not.
AS_WRITTEN = ["x² + y² = z²", "½ cup, ¼ tsp, H₂O", "你好，世界！（测试）", "ｆｕｌｌ width", "emoji 👩‍💻 🎉",
              "שלום עולם مرحبا", "def f(x):\n    if x:\n\n        return 1\n\n\n    return 0\n", "  lead\t\n"]


@pytest.mark.parametrize("text", AS_WRITTEN)
def test_text_is_kept_as_written(text):
    assert normalize_text(text) == unicodedata.normalize("NFC", text) == text


def test_nfc_and_line_endings_only():
    assert normalize_text("cafe\u0301\r\nline\rnext") == "caf\u00e9\nline\nnext"
    assert normalize_text("ﬁ ² ①") == "ﬁ ² ①", "compatibility characters are content, not folded"


def test_opt_in_cleaning_steps():
    text = "  a  \n\n\n\nb\t \n"
    assert Normalizer(["strip_whitespace"])(text) == "a\n\n\n\nb"
    assert Normalizer(["collapse_blank_lines"])(text) == "  a  \n\nb\t \n"
    assert Normalizer(["strip_whitespace", "collapse_blank_lines"])(text) == "a\n\nb"


def test_dedup_and_near_dup_keys_fold_without_touching_text():
    batch = {"q": ["x² ？", "x2 ?  \n", "Why"], "a": ["A", "A", "  "]}
    out = clean_batch(batch, [0, 1, 2], columns=PR, src=SRC, src_id=0, normalize=KEEP)
    assert out["messages"][0][0]["content"] == "x² ？", "stored text unchanged"
    assert out["messages"][1][0]["content"] == "x2 ?  \n"
    assert out["_hash"][0] == out["_hash"][1], "equal under the dedup key: exact duplicates"
    assert dedup_key("x² ？") == dedup_key("x2 ?") and loose_key("Ｘ²!") == loose_key("x2")
    assert out["_drop"] == ["", "", "empty_field"]


def test_wrong_type_is_a_bad_row_with_its_reason():
    out = clean_batch({"q": ["ok", 42], "a": ["x", "y"]}, [0, 1], columns=PR, src=SRC, src_id=0, normalize=KEEP)
    assert out["_drop"] == ["", "bad_row"]
    assert out["_why"][1] == "wrong_type: data.prompt_column 'q' holds a int (42) where text is expected"


CALL = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
BAD_CONVERSATIONS = {
    "missing_role": [{"content": "x"}],
    "unknown_role": [{"role": "narrator", "content": "x"}],
    "wrong_type": [{"role": "user", "content": 3}],
    "empty_conversation": [],
    "tool_without_call": [{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}],
    "empty_assistant_turn": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}],
    "bad_tool_calls": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": "[{"}],
}


@pytest.mark.parametrize("reason", sorted(BAD_CONVERSATIONS))
def test_bad_conversations_are_dropped_with_a_reason(reason):
    good = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": CALL},
            {"role": "tool", "content": "42"}, {"role": "assistant", "content": "It is 42."}]
    out = clean_batch({"m": [good, BAD_CONVERSATIONS[reason]]}, [0, 1], columns=MSG, src=SRC, src_id=0,
                      normalize=KEEP)
    assert out["_drop"] == ["", "bad_row"]
    assert out["_why"][1].split(":")[0] == reason
    assert out["messages"][0][1]["tool_calls"] == '[{"type": "function", "id": "c1", "function": {"name": "f", ' \
                                                  '"arguments": {"a": 1}}}]'


def test_sharegpt_roles_are_mapped():
    cols = Columns("sharegpt", {"messages": ("data.conversations_column", "c")},
                   {"system": "system", "human": "user", "gpt": "assistant", "bot": "assistant"})
    conv = [{"from": "system", "value": ""}, {"from": "human", "value": "Hi"},
            {"from": "bot", "value": "Hello", "weight": 0},
            {"from": "human", "value": "More"}, {"from": "gpt", "value": "Sure"}]
    out = clean_batch({"c": [conv, [{"from": "narrator", "value": "x"}]]}, [0, 1], columns=cols, src=SRC,
                      src_id=0, normalize=KEEP)
    assert [(m["role"], m["content"], m["train"]) for m in out["messages"][0]] == [
        ("user", "Hi", True), ("assistant", "Hello", False), ("user", "More", True), ("assistant", "Sure", True)]
    assert out["_why"][1].startswith("unknown_role: turn 0: unknown speaker 'narrator'")


def test_alpaca_input_joins_the_instruction():
    cols = Columns("alpaca", {"instruction": ("data.instruction_column", "i"), "input": ("data.input_column", "n"),
                              "output": ("data.output_column", "o")}, {})
    out = clean_batch({"i": ["Translate", "Greet"], "n": ["bonjour", ""], "o": ["hello", "hi"]}, [0, 1],
                      columns=cols, src=SRC, src_id=0, normalize=KEEP)
    assert [m["content"] for m in out["messages"][0]] == ["Translate\n\nbonjour", "hello"]
    assert [m["content"] for m in out["messages"][1]] == ["Greet", "hi"]


def test_first_occurrences_keeps_first_of_each():
    mask = first_occurrences(np.array([5, 3, 5, 7, 3]))
    assert mask.tolist() == [True, True, False, True, False]


def test_first_occurrences_matches_np_unique_first_indices():
    # The reference: np.unique's first index of every distinct hash (what dedup used before).
    rng = np.random.default_rng(0)
    for hashes in (rng.integers(-50, 50, 10_000), rng.integers(-2**63, 2**63 - 1, 5_000, dtype=np.int64),
                   np.zeros(0, dtype=np.int64), np.array([7])):
        expected = np.zeros(len(hashes), dtype=bool)
        expected[np.unique(hashes, return_index=True)[1]] = True
        assert np.array_equal(first_occurrences(hashes), expected)


def test_sharegpt_function_call_and_observation_become_a_tool_call_and_its_result():
    from data_prep.config import DEFAULT_SHAREGPT_ROLES

    cols = Columns("sharegpt", {"messages": ("data.conversations_column", "c")}, DEFAULT_SHAREGPT_ROLES)
    conv = [{"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": "-3 C"}, {"from": "gpt", "value": "It is -3 C."}]
    out = clean_batch({"c": [conv]}, [0], columns=cols, src=SRC, src_id=0, normalize=KEEP)
    assert out["_drop"] == [""]
    turns = out["messages"][0]
    assert [t["role"] for t in turns] == ["user", "assistant", "tool", "assistant"]
    assert turns[1]["tool_calls"] == '[{"type": "function", "function": {"name": "get_weather", "arguments": ' \
                                     '{"city": "Oslo"}}}]'


@pytest.mark.parametrize("column,turn,kind", [("messages", {"from": "human", "value": "x"}, "sharegpt"),
                                              ("conversations", {"role": "user", "content": "x"}, "messages"),
                                              ("conversations", {"from": "gpt", "value": "x"}, "sharegpt")])
def test_auto_tells_sharegpt_from_messages_by_the_first_turn(column, turn, kind):
    import datasets

    from data_prep.config import DataConfig
    from data_prep.readers import resolve_columns, source_settings

    ds = datasets.Dataset.from_list([{column: [turn]}, {column: [turn]}])
    cfg = DataConfig(sources=["x.jsonl"])
    cols = resolve_columns(ds, source_settings(cfg, 0), SRC)
    assert cols.kind == kind and cols.names["messages"][1] == column


def test_dedup_key_equals_its_definition_on_random_whitespace():
    # Equivalence: dedup_key skips its regular expressions when they cannot match; the definition runs
    # them always (NFKC, strip_whitespace, collapse_blank_lines) and must agree on every string.
    import random

    from data_prep.clean import collapse_blank_lines, strip_whitespace

    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice([" ", "\t", "\n", "\n\n\n", "a", "\u00e9", "\ufb01", "\r"]) for _ in range(12))
        assert dedup_key(text) == collapse_blank_lines(strip_whitespace(unicodedata.normalize("NFKC", text))), text


def test_hash64_is_sha256_of_the_sorted_json_text():
    # The hashes decide splits and deduplication: the encoder built once must write what json.dumps writes.
    import hashlib
    import json

    from data_prep.clean import hash64

    for obj in (["text", "caf\u00e9 \u2028 \"q\""], [["user", "x", "", True]], {"b": 1.5, "a": [None, "\ufb01"]}):
        text = json.dumps(obj, ensure_ascii=False, sort_keys=True)
        assert hash64(obj) == int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def test_prompt_prefix_hash_is_the_hash_of_the_prompts_first_characters():
    from data_prep.clean import PREFIX_CHARS, hash64, prompt_of

    questions = ["q" * (PREFIX_CHARS - 30), "w" * (PREFIX_CHARS - 6), "e" * (PREFIX_CHARS + 50), ""]
    batch = {"q": questions, "a": ["yes"] * len(questions)}
    out = clean_batch(batch, list(range(len(questions))), columns=PR, src=SRC, src_id=0, normalize=KEEP)
    for i, messages in enumerate(out["messages"]):
        prompt = prompt_of({"messages": messages, "tools": "", "text": ""})
        assert out["_pprefix"][i] == (hash64(prompt[:PREFIX_CHARS]) if prompt else 0)
        assert out["_phash"][i] == (hash64(prompt) if prompt else 0)
    assert out["_pprefix"][2] != out["_phash"][2]  # the long prompt really is cut


def test_loose_key_ascii_path_equals_the_expression_on_every_ascii_character():
    # Equivalence: the byte-table path for ASCII text vs the regular expression every other text goes through
    # (exact: the near-duplicate hashes of existing data must not change).
    import random
    import re

    reference = lambda t: re.sub(r"[\W_]+", " ", t.casefold()).strip()  # noqa: E731
    rng = random.Random(0)
    texts = ["".join(chr(rng.randrange(128)) for _ in range(rng.randrange(40))) for _ in range(3000)]
    texts += [chr(c) * 3 for c in range(128)] + ["  What is a P-value?\n", "snake_case_name", "a\x00b\x7fc"]
    assert all(t.isascii() for t in texts)
    assert [loose_key(t) for t in texts] == [reference(t) for t in texts]


def test_hash64_hashes_the_text_json_dumps_writes():
    # Equivalence: the hashes of existing data (dedup, splits, reports) must not move with how the JSON text
    # is built: sha256 of json.dumps(ensure_ascii=False, sort_keys=True), first 8 bytes, little-endian signed.
    import hashlib
    import json

    from data_prep.clean import hash64

    values = ["plain", 'naïve 你好 "q" \\ \n\t\u0001', ["text", "x"],
              [["user", "Hi", "", True], ["assistant", "A", "", False], ""],
              {"b": 1, "a": [1.5, None, {"z": "ü", "y": -3}]}, [], "", 0, [True, False, None]]
    for v in values:
        digest = hashlib.sha256(json.dumps(v, ensure_ascii=False, sort_keys=True).encode("utf-8")).digest()
        assert hash64(v) == int.from_bytes(digest[:8], "little", signed=True), v
