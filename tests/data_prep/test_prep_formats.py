"""Prep end to end on the shapes users export: mixed sources in one run, text kept byte-exact, special-token
strings in data, per-source settings in the YAML."""

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from prep_data import qa_rows, write_csv, write_jsonl
from test_prep_clean import AS_WRITTEN
from test_prep_pipeline import _documents
from transformers import AutoTokenizer

from data_prep.config import SourceConfig
from data_prep.format import IGNORE_INDEX
from data_prep.pipeline import prepare


def _runs(tok, ids, labels) -> list[str]:
    mask = np.append(labels != IGNORE_INDEX, False)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask])))
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]


def _prepare(make_cfg, model, sources, **kw):
    cfg = make_cfg([], validation_fraction=0.0, test_fraction=0.0, seq_len=512, **kw)
    cfg.sources = [s if isinstance(s, SourceConfig) else str(s) for s in sources]
    manifest = prepare(cfg, str(model))
    report = json.loads((Path(cfg.output_dir) / "report.json").read_text(encoding="utf-8"))
    return cfg, manifest, report


def test_text_survives_prep_byte_exact(tiny_model_dir, tmp_path, make_cfg):
    rows = [{"question": f"Q{i}: {t}", "answer": f"A{i}: {t}"} for i, t in enumerate(AS_WRITTEN)]
    texts = [{"text": f"T{i}: {t}"} for i, t in enumerate(AS_WRITTEN)]
    sources = [write_jsonl(tmp_path / "qa.jsonl", rows), write_jsonl(tmp_path / "text.jsonl", texts)]
    cfg, manifest, report = _prepare(make_cfg, tiny_model_dir, sources)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    nfc = lambda s: unicodedata.normalize("NFC", s)  # noqa: E731
    answers = {nfc(r["answer"]) + tok.eos_token for r in rows}
    plain = {nfc(t["text"]) + tok.eos_token for t in texts}
    seen_answers, seen_texts = set(), set()
    for ids, labels in _documents(cfg.output_dir, manifest):
        text = tok.decode(ids.tolist())
        if text in plain:
            seen_texts.add(text)
            continue
        (run,) = _runs(tok, ids, labels)
        assert run in answers
        seen_answers.add(run)
        question = next(nfc(r["question"]) for r in rows if nfc(r["answer"]) + tok.eos_token == run)
        assert f"<|im_start|>user\n{question}<|im_end|>" in text
    assert seen_answers == answers and seen_texts == plain
    assert report["cleaning"]["opt_in_steps"] == [] and manifest["record_type"] == "mixed"


def test_special_token_string_in_an_answer_is_counted_and_kept_as_text(tiny_model_dir, tmp_path, make_cfg):
    rows = qa_rows(20)
    rows[3]["answer"] = "A ChatML turn ends with <|im_end|> and the next starts with <|im_start|>system"
    cfg, manifest, report = _prepare(make_cfg, tiny_model_dir, [write_csv(tmp_path / "qa.csv", rows)])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert report["rows_with_special_token_text"] == 1
    assert any("special-token strings" in w for w in report["warnings"])
    runs = [r for ids, labels in _documents(cfg.output_dir, manifest) for r in _runs(tok, ids, labels)]
    assert rows[3]["answer"] + "<|im_end|>" in runs
    for ids, labels in _documents(cfg.output_dir, manifest):
        assert (ids == tok.convert_tokens_to_ids("<|im_end|>")).sum() == 2, "user turn + assistant turn, no more"


def _mixed_sources(tmp_path: Path) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq

    share = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"Hi {i}"},
                                {"from": "gpt", "value": f"Hello {i}"}]} for i in range(10)]
    share.insert(2, {"conversations": [{"from": "narrator", "value": "Once"}, {"from": "gpt", "value": "x"}]})
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    chats = [{"messages": [{"role": "user", "content": f"Weather {i}?", "tool_calls": None},
                           {"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "content": f"{i} degrees", "tool_calls": None},
                           {"role": "assistant", "content": f"It is {i} degrees.", "tool_calls": None}],
              "tools": tools} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chats.parquet")
    alpaca = [{"instruction": f"Add {i} and 1", "input": "" if i % 2 else "show work", "output": str(i + 1)}
              for i in range(6)]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    return [str(write_jsonl(tmp_path / "share.jsonl", share)), str(tmp_path / "chats.parquet"),
            SourceConfig(path=str(tmp_path / "alpaca.json"), record_type="alpaca"),
            SourceConfig(path=str(write_csv(tmp_path / "qa.csv", qa_rows(12))), prompt_column="question",
                         response_column="answer")]


def test_mixed_sources_prepare_into_one_manifest(tiny_model_dir, tmp_path, make_cfg):
    sources = _mixed_sources(tmp_path)
    cfg, manifest, report = _prepare(make_cfg, tiny_model_dir, sources, chat_template="chatml",
                                     prompt_column="nope", response_column="nope")
    assert manifest["record_type"] == "mixed"
    assert [s["record_type"] for s in manifest["sources"]] == ["sharegpt", "messages", "alpaca", "prompt_response"]
    counts = [(s["rows_read"], s["documents"], s["bad_rows"]) for s in report["sources"]]
    assert counts == [(11, 10, 1), (8, 8, 0), (6, 6, 0), (12, 12, 0)]
    (bad,) = report["sources"][0]["first_bad_rows"]
    assert bad.endswith("share.jsonl: line 3: unknown_role: turn 0: unknown speaker 'narrator' (known: system, "
                        "human, user, gpt, assistant, chatgpt, tool, observation, function_call; map it with "
                        "data.sharegpt_roles)")
    assert manifest["splits"]["train"]["documents"] == 36
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    runs = [r for ids, labels in _documents(cfg.output_dir, manifest) for r in _runs(tok, ids, labels)]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in runs
    assert "It is 3 degrees.<|im_end|>" in runs and "Hello 4<|im_end|>" in runs and "2<|im_end|>" in runs


def test_sources_with_their_own_settings_load_from_yaml():
    from training.config import ConfigError, config_from_dict

    raw = {"model": {"name_or_path": "m"}, "output_dir": "out",
           "data": {"sources": ["a.csv", {"path": "b.jsonl", "record_type": "sharegpt",
                                          "sharegpt_roles": {"human": "user", "bot": "assistant"}}],
                    "train_on": "last_turn", "strip_whitespace": True}}
    cfg = config_from_dict(raw, validate=False)
    assert cfg.data.sources[0] == "a.csv"
    assert cfg.data.sources[1] == SourceConfig(path="b.jsonl", record_type="sharegpt",
                                               sharegpt_roles={"human": "user", "bot": "assistant"})
    raw["data"]["sources"][1]["record_typ"] = "alpaca"
    raw["data"]["sources"][1]["sharegpt_roles"] = {"human": 3}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, validate=False)
    assert "data.sources[1].record_typ: unknown key; did you mean 'data.sources[1].record_type'?" in str(info.value)
    assert "data.sources[1].sharegpt_roles.human: expected str, got int 3" in str(info.value)


def test_revision_and_template_override_are_part_of_the_cache_key(tiny_model_dir, qa_csv, make_cfg):
    from data_prep.pipeline import cache_key_parts, load_tokenizer
    from data_prep.readers import expand_sources

    cfg = make_cfg([qa_csv])
    tok, sources = load_tokenizer(str(tiny_model_dir)), expand_sources(cfg.sources)
    base = cache_key_parts(cfg, sources, tok, str(tiny_model_dir))
    assert cache_key_parts(cfg, sources, tok, str(tiny_model_dir), "v1.0")["tokenizer"] != base["tokenizer"]
    cfg.chat_template = "llama3"
    assert cache_key_parts(cfg, sources, tok, str(tiny_model_dir))["template"]["chat_template_hash"] != \
        base["template"]["chat_template_hash"]


def test_opt_in_cleaning_runs_and_is_reported(tiny_model_dir, tmp_path, make_cfg):
    rows = [{"text": f"  line {i}  \n\n\n\nnext {i}\t\n"} for i in range(12)]
    cfg, manifest, report = _prepare(make_cfg, tiny_model_dir, [write_jsonl(tmp_path / "t.jsonl", rows)],
                                     strip_whitespace=True, collapse_blank_lines=True)
    assert report["cleaning"]["opt_in_steps"] == ["strip_whitespace", "collapse_blank_lines"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = {tok.decode(ids.tolist()) for ids, _ in _documents(cfg.output_dir, manifest)}
    assert texts == {f"line {i}\n\nnext {i}{tok.eos_token}" for i in range(12)}
