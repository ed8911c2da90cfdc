"""Every kind of bad input gets one DataError naming where and how to fix it, and leaves no output behind."""

import json
from pathlib import Path

import pytest
from prep_data import qa_rows, write_csv, write_jsonl

from data_prep.errors import DataError
from data_prep.pipeline import prepare


def _expect_error(cfg, model, pattern):
    with pytest.raises(DataError, match=pattern) as info:
        prepare(cfg, str(model))
    out = Path(cfg.output_dir)
    assert not (out / "manifest.json").exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], "no half-written folder may remain"
    assert getattr(info.value, "user_error", False)
    return str(info.value)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


CSV_CASES = {
    "unterminated_quote": (b'question,answer\nWhat?,Fine\n"Why,Because\nHow?,So\n',
                           r"bad\.csv: line 3: malformed CSV .*close the quote"),
    "too_many_fields": (b"question,answer\nWhat?,Fine\nWhy?,Because,extra\nHow?,So\n",
                        r"bad\.csv: line 3: 3 fields but the header has 2"),
    "not_utf8": (b"question,answer\nWhat?,Fine\nWhy?,Caf\xe9 au lait\n",
                 r"bad\.csv: line 3: bytes that are not UTF-8 \(byte offset 35 .*re-save the file as UTF-8"),
    "empty_file": (b"", r"bad\.csv: the file is empty"),
    "header_only": (b"question,answer\n", r"bad\.csv: no data rows"),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_bad_csv(case, tiny_model_dir, tmp_path, make_cfg):
    data, pattern = CSV_CASES[case]
    _expect_error(make_cfg([_write(tmp_path / "bad.csv", data)]), tiny_model_dir, pattern)


def test_invalid_json_line(tiny_model_dir, tmp_path, make_cfg):
    good = json.dumps({"question": "What?", "answer": "Fine"})
    path = _write(tmp_path / "bad.jsonl", f"{good}\n{good}\n{{\"question\": \"Why?\", \"answer\": \n{good}\n".encode())
    _expect_error(make_cfg([path]), tiny_model_dir, r"bad\.jsonl: line 3: invalid JSON")


def test_non_utf8_jsonl(tiny_model_dir, tmp_path, make_cfg):
    data = b'{"question": "What?", "answer": "Fine"}\n{"question": "Caf\xe9", "answer": "x"}\n'
    path = _write(tmp_path / "bad.jsonl", data)
    _expect_error(make_cfg([path]), tiny_model_dir, r"bad\.jsonl: line 2: bytes that are not UTF-8")


def test_number_in_one_json_row_drops_that_row_with_its_location(tiny_model_dir, tmp_path, make_cfg):
    rows = qa_rows(20)
    rows[1] = {"question": 3.5, "answer": "x"}
    cfg = make_cfg([write_jsonl(tmp_path / "rows.jsonl", rows)], validation_fraction=0.0, test_fraction=0.0)
    manifest = prepare(cfg, str(tiny_model_dir))
    report = json.loads((Path(cfg.output_dir) / "report.json").read_text())
    (src,) = report["sources"]
    assert manifest["splits"]["train"]["rows_dropped"]["bad_row"] == 1 and src["bad_rows"] == 1
    assert src["bad_rows_by_reason"] == {"wrong_type": 1} and src["documents"] == 19
    assert src["first_bad_rows"][0].endswith("rows.jsonl: line 2: wrong_type: data.prompt_column 'question' holds "
                                             "a float (3.5) where text is expected")


def test_file_whose_every_row_is_bad_is_one_error(tiny_model_dir, tmp_path, make_cfg):
    import datasets

    datasets.Dataset.from_dict({"question": [1, 2], "answer": ["a", "b"]}).to_parquet(str(tmp_path / "n.parquet"))
    _expect_error(make_cfg([tmp_path / "n.parquet"]), tiny_model_dir,
                  r"n\.parquet: every row is unusable as prompt_response records \(first: .*n\.parquet: row 1: "
                  r"wrong_type: data\.prompt_column 'question' holds a int .*expected two text columns")


def test_messages_not_a_list_of_turns(tiny_model_dir, tmp_path, make_cfg):
    rows = [{"messages": "user: Hi"}, {"messages": [{"from": "human", "value": "Hi"}]}]
    _expect_error(make_cfg([write_jsonl(tmp_path / "chat.jsonl", rows)], record_type="messages"), tiny_model_dir,
                  r"chat\.jsonl: every row is unusable as messages records \(first: .*chat\.jsonl: line 1: "
                  r"wrong_type: column 'messages' holds a str.*expected a list of \{\"role\"")


def test_missing_configured_column(tiny_model_dir, tmp_path, make_cfg):
    path = write_csv(tmp_path / "qa.csv", qa_rows(5), columns=("question", "answer"))
    cfg = make_cfg([path], record_type="prompt_response", response_column="reply")
    _expect_error(cfg, tiny_model_dir,
                  r"qa\.csv: column 'reply' \(data\.response_column.*columns found: question, answer")


def test_auto_with_no_known_columns(tiny_model_dir, tmp_path, make_cfg):
    path = _write(tmp_path / "x.csv", b"foo,bar\n1,2\n")
    _expect_error(make_cfg([path]), tiny_model_dir,
                  r"x\.csv: data\.record_type auto found none.*columns found: foo, bar")


def test_empty_after_cleaning_prints_drop_counts(tiny_model_dir, tmp_path, make_cfg):
    path = _write(tmp_path / "qa.csv", b"question,answer\nWhat?,\nWhy?, \n,Because\n")
    _expect_error(make_cfg([path]), tiny_model_dir,
                  r"no training rows left .*3 rows read, dropped: bad_row 0, empty_field 3")


def test_seq_len_smaller_than_template(tiny_model_dir, qa_csv, make_cfg):
    _expect_error(make_cfg([qa_csv], seq_len=4), tiny_model_dir, r"data\.seq_len 4 is too small: the template")


def test_over_length_row_with_excess_length_error(tiny_model_dir, tmp_path, make_cfg):
    rows = qa_rows(10) + [{"question": "Long?", "answer": "word " * 400}]
    path = write_csv(tmp_path / "qa.csv", rows)
    _expect_error(make_cfg([path], excess_length="error", validation_fraction=0.0, test_fraction=0.0),
                  tiny_model_dir, r"qa\.csv: data row 11 .*more than data\.seq_len 256")


def test_tokenizer_without_chat_template(tiny_model_copy, qa_csv, make_cfg):
    for name in ("chat_template.jinja", "chat_template.json"):
        (tiny_model_copy / name).unlink(missing_ok=True)
    conf_path = tiny_model_copy / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text())
    conf.pop("chat_template", None)
    conf_path.write_text(json.dumps(conf))
    _expect_error(make_cfg([qa_csv]), tiny_model_copy, r"no chat template.*data\.template: format")


def test_missing_source_and_foreign_output_dir(tiny_model_dir, qa_csv, make_cfg, tmp_path):
    _expect_error(make_cfg([tmp_path / "nope.csv"]), tiny_model_dir, r"data\.sources\[0\]: .*nope\.csv does not exist")
    cfg = make_cfg([qa_csv])
    Path(cfg.output_dir).mkdir()
    (Path(cfg.output_dir) / "precious.txt").write_text("keep me")
    _expect_error(cfg, tiny_model_dir, r"data\.output_dir .* is not a prepared-data folder")
    assert (Path(cfg.output_dir) / "precious.txt").read_text() == "keep me"
