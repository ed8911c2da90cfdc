import numpy as np
import pytest
from transformers import AutoTokenizer

from data_prep.clean import normalize_text
from data_prep.config import DataConfig
from data_prep.records import Columns, to_record
from data_prep.errors import DataError
from data_prep.format import IGNORE_INDEX
from data_prep.template import SKIPPED, Templater, supervised_mask, tokenize_batch, tokenize_kept


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _supervised_text(tok, ids, labels):
    return tok.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])


def _canonical(kind, record):
    """A test record in its source shape, as the canonical record cleaning makes of it."""
    names = {"prompt_response": ["prompt", "response"], "messages": ["messages"], "text": ["text"]}[kind]
    cols = Columns(kind, {n: (f"data.{n}_column", n) for n in names}, {})
    return to_record(record, cols, normalize_text)


def _batch(kind, records):
    canon = [_canonical(kind, r) for r in records]
    cols = {k: [r[k] for r in canon] for k in canon[0]}
    return {**cols, "_src": [0] * len(records), "_row": list(range(len(records)))}


def _tokenize(tok, cfg, kind, records, seq_len=256, excess="truncate"):
    t = Templater(tok, cfg, {kind})
    return tokenize_batch(_batch(kind, records), templater=t, seq_len=seq_len, excess_length=excess,
                          where=lambda s, r: f"file row {r}")


def test_labels_from_spans_overlap_rule():
    ids, offsets = np.array([1, 2, 3, 4]), np.array([(0, 3), (3, 6), (6, 9), (9, 12)])
    labels = np.where(supervised_mask(offsets, np.array([4]), [[(5, 9)]]), ids, IGNORE_INDEX)
    assert labels.tolist() == [IGNORE_INDEX, 2, 3, IGNORE_INDEX]


def test_chat_prompt_response_masks_prompt_and_ends_with_eos(tok):
    out = _tokenize(tok, DataConfig(), "prompt_response", [{"prompt": "What is PCA?", "response": "A projection."}])
    ids, labels = out["input_ids"][0], out["labels"][0]
    text = tok.decode(ids)
    assert text == tok.apply_chat_template([{"role": "user", "content": "What is PCA?"},
                                            {"role": "assistant", "content": "A projection."}], tokenize=False)
    assert _supervised_text(tok, ids, labels) == "A projection." + tok.eos_token, "not the newline after EOS"
    assert tok.eos_token_id in labels.tolist(), "the turn's EOS carries loss so the model learns to stop"
    first_supervised = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
    assert tok.decode(ids[:first_supervised]).endswith("assistant\n")
    assert "PCA" not in _supervised_text(tok, ids, labels)


def test_multi_turn_only_assistant_turns_carry_loss(tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Define recall"},
            {"role": "assistant", "content": "TP over TP plus FN"}]
    out = _tokenize(tok, DataConfig(), "messages", [{"messages": conv}])
    sup = _supervised_text(tok, out["input_ids"][0], out["labels"][0])
    assert "Hello" in sup and "TP over TP plus FN" in sup
    for prompt_text in ("Be brief", "Hi there", "Define recall", "user"):
        assert prompt_text not in sup


def test_train_on_prompt_and_system_prompt(tok):
    cfg = DataConfig(train_on_prompt=True, system_prompt="You are terse.")
    out = _tokenize(tok, cfg, "prompt_response", [{"prompt": "Q?", "response": "A."}])
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert "You are terse." in tok.decode(ids)
    assert (labels[1:] != IGNORE_INDEX).all() and labels[0] == IGNORE_INDEX


def test_format_template_masks_text_before_response(tok):
    cfg = DataConfig(template="format", format_string="Question: {prompt}\nAnswer: {response}")
    out = _tokenize(tok, cfg, "prompt_response", [{"prompt": "What is bias?", "response": "Systematic error."}])
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert tok.decode(ids) == "Question: What is bias?\nAnswer: Systematic error." + tok.eos_token
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert _supervised_text(tok, ids, labels).strip() == "Systematic error." + tok.eos_token
    assert "bias" not in _supervised_text(tok, ids, labels)


def test_text_rows_are_fully_supervised_except_first_token(tok):
    out = _tokenize(tok, DataConfig(), "text", [{"text": "Gradient descent moves downhill."}])
    labels = out["labels"][0]
    assert labels[0] == IGNORE_INDEX and (labels[1:] != IGNORE_INDEX).all()
    assert out["input_ids"][0][-1] == tok.eos_token_id


def test_excess_length_modes(tok):
    rec = [{"text": "word " * 200}]
    trunc = _tokenize(tok, DataConfig(), "text", rec, seq_len=32, excess="truncate")
    assert trunc["n_tokens"][0] == 32 and trunc["truncated"][0] and trunc["n_tokens_raw"][0] > 32
    drop = _tokenize(tok, DataConfig(), "text", rec, seq_len=32, excess="drop")
    assert drop["_drop2"] == ["too_long"]
    with pytest.raises(DataError, match="file row 0: .* more than data.seq_len 32"):
        _tokenize(tok, DataConfig(), "text", rec, seq_len=32, excess="error")


def test_truncation_that_removes_the_response_is_dropped(tok):
    out = _tokenize(tok, DataConfig(), "prompt_response", [{"prompt": "long " * 100, "response": "short"}],
                    seq_len=40)
    assert out["_drop2"] == ["no_supervised_tokens"]


def test_tokenizer_without_chat_template_suggests_format(tok):
    bare = AutoTokenizer.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template.*data.template: format"):
        Templater(bare, DataConfig(template="chat"), {"prompt_response"})


def test_overhead_counts_template_tokens(tok):
    assert Templater(tok, DataConfig(), {"prompt_response"}).overhead_tokens({"prompt_response"}) >= 8
    assert Templater(tok, DataConfig(), {"text"}).overhead_tokens({"text"}) == 1


def test_eos_is_appended_after_the_answer_when_the_template_has_none(tok):
    plain = AutoTokenizer.from_pretrained(tok.name_or_path)
    plain.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                           "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    answer = _tokenize(plain, DataConfig(), "prompt_response", [{"prompt": "Q?", "response": "A."}])
    assert answer["input_ids"][0][-1] == plain.eos_token_id and answer["labels"][0][-1] == plain.eos_token_id
    conv = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}, {"role": "user", "content": "Ok"}]
    trailing_user = _tokenize(plain, DataConfig(), "messages", [{"messages": conv}])
    assert plain.eos_token_id not in trailing_user["input_ids"][0].tolist(), "no EOS after a user turn"
    assert _supervised_text(plain, trailing_user["input_ids"][0], trailing_user["labels"][0]).strip() == "A."


def test_tokenize_kept_tokenizes_the_kept_rows_as_tokenize_batch_does(tok):
    # Equivalence: the kept rows of a batch, tokenized in place, vs tokenize_batch on those rows alone;
    # the rows an earlier stage dropped come out empty and marked SKIPPED, so the output stays row for row.
    cfg = DataConfig()
    records = [{"prompt": f"Question {i}?", "response": f"Answer number {i}."} for i in range(6)]
    t = Templater(tok, cfg, {"prompt_response"})
    kwargs = {"templater": t, "seq_len": 256, "excess_length": "truncate", "where": lambda s, r: f"row {r}"}
    keep = np.array([False] * 10 + [True, False, True, True, False, True])  # rows 10-15 are this batch
    out = tokenize_kept(_batch("prompt_response", records), list(range(10, 16)), keep=keep, **kwargs)
    alone = tokenize_batch(_batch("prompt_response", [records[i] for i in (0, 2, 3, 5)]), **kwargs)
    for key in alone:
        assert [_plain(out[key][i]) for i in (0, 2, 3, 5)] == [_plain(v) for v in alone[key]], key
    for i in (1, 4):
        assert len(out["input_ids"][i]) == 0 and out["n_tokens"][i] == 0 and out["_drop2"][i] == SKIPPED
    everything = tokenize_kept(_batch("prompt_response", records), list(range(10, 16)), keep=np.ones(16, bool),
                               **kwargs)
    assert [_plain(v) for v in everything["input_ids"]][2] == _plain(alone["input_ids"][1])


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def test_token_table_is_the_table_datasets_writes(tok):
    # Equivalence: the batch-built Arrow table vs datasets' own conversion of the same output (per row).
    import datasets

    from data_prep.template import token_features, token_table

    records = [{"prompt": f"Question {i}?", "response": "Answer. " * i} for i in range(5)]
    t = Templater(tok, DataConfig(), {"prompt_response"})
    out = tokenize_kept(_batch("prompt_response", records), list(range(5)), keep=np.array([1, 0, 1, 1, 1], bool),
                        templater=t, seq_len=16, excess_length="truncate", where=lambda s, r: f"row {r}")
    expected = datasets.Dataset.from_dict(out, features=token_features()).data.table
    assert token_table(out).equals(expected)
    assert token_table(out).column("input_ids").to_pylist()[1] == []
    # A batch whose rows are all kept keeps its token columns flat (Ragged); written as they are, the same table.
    whole = tokenize_kept(_batch("prompt_response", records), list(range(5)), keep=np.ones(5, bool),
                          templater=t, seq_len=16, excess_length="truncate", where=lambda s, r: f"row {r}")
    as_lists = {k: list(v) for k, v in whole.items()}
    assert token_table(whole).equals(datasets.Dataset.from_dict(as_lists, features=token_features()).data.table)


def _finish_one_by_one(ids, offsets, spans, append_eos, eos_id, seq_len, excess):
    """Reference for finish_batch: one document, token by token."""
    labels = [t if any(a < e and b > s for s, e in spans for a, b in [off]) else IGNORE_INDEX
              for t, off in zip(ids, offsets)]
    ids = list(ids)
    if append_eos:
        ids, labels = ids + [eos_id], labels + [eos_id]
    labels[:1] = [IGNORE_INDEX] * len(labels[:1])
    raw, drop, truncated = len(ids), "", False
    if raw > seq_len and excess == "drop":
        drop = "too_long"
    elif raw > seq_len:
        ids, labels, truncated = ids[:seq_len], labels[:seq_len], True
    n_sup = sum(l != IGNORE_INDEX for l in labels)
    return {"input_ids": ids, "labels": labels, "n_tokens_raw": raw, "n_tokens": len(ids), "n_supervised": n_sup,
            "truncated": truncated, "_drop2": drop or ("" if n_sup else "no_supervised_tokens")}


@pytest.mark.parametrize("excess", ["truncate", "drop"])
def test_finish_batch_equals_finishing_each_document_alone(excess):
    # Equivalence (exact, integers): the whole batch's labels, EOS, first-token and length rules at once vs one
    # document at a time. Offsets are random, not monotone, and overlap spans of any count, empty documents
    # included, so the overlap test is checked for every token-span pair.
    from data_prep.template import finish_batch

    rng = np.random.default_rng(0)
    docs = []
    for _ in range(300):
        n = int(rng.choice([0, 1, 2, int(rng.integers(3, 40))]))
        starts = rng.integers(0, 60, n)
        offsets = [(int(a), int(a + rng.integers(0, 5))) for a in starts]
        spans = [tuple(sorted(map(int, rng.integers(0, 64, 2)))) for _ in range(int(rng.integers(0, 4)))]
        docs.append((rng.integers(5, 100, n).tolist(), offsets, spans, bool(rng.integers(0, 2))))
    seq_len, eos = 20, 2
    out = finish_batch([(ids, off) for ids, off, _, _ in docs], [s for _, _, s, _ in docs],
                       np.array([a for *_, a in docs]), eos_id=eos, seq_len=seq_len, excess_length=excess,
                       where=lambda i: f"row {i}")
    assert len(out["input_ids"]) == len(docs)
    for i, (ids, off, spans, append) in enumerate(docs):
        want = _finish_one_by_one(ids, off, spans, append, eos, seq_len, excess)
        got = {k: _plain(v[i]) for k, v in out.items()}
        assert got == want, i
    assert {d for d in out["_drop2"]} >= {"", "no_supervised_tokens"}
    assert any(out["truncated"]) == (excess == "truncate") and ("too_long" in out["_drop2"]) == (excess == "drop")


def test_finish_batch_names_the_first_over_length_document():
    from data_prep.template import finish_batch

    encoded = [([5, 6], [(0, 1), (1, 2)]), ([5] * 9, [(0, 1)] * 9), ([5] * 12, [(0, 1)] * 12)]
    with pytest.raises(DataError, match=r"^row 1: 10 tokens after templating, more than data.seq_len 8"):
        finish_batch(encoded, [[(0, 2)]] * 3, np.array([True, True, False]), eos_id=2, seq_len=8,
                     excess_length="error", where=lambda i: f"row {i}")
