"""The data report: statistics, warnings for the classic mistakes, the printed table."""

import json
from pathlib import Path

import numpy as np
from prep_data import qa_rows, write_csv

from data_prep.pipeline import prepare
from data_prep.report import count_params, length_stats, redundant_context


def test_redundant_context_counts_rows_sharing_a_prefix():
    ctx = redundant_context(np.array([7, 7, 7, 3, 4, 4, 0, 0]))
    assert ctx["rows_sharing_context"] == 5 and ctx["largest_groups"] == [3, 2]
    assert ctx["share"] == round(5 / 6, 4), "text rows (hash 0) are not counted"


def test_length_stats():
    stats = length_stats(np.array([10, 20, 30, 600]), 512)
    assert stats["max"] == 600 and stats["over_seq_len"] == 1 and stats["p50"] == 25.0


def test_count_params_reads_config_without_weights(tiny_model_dir, tmp_path):
    recorded = json.loads((Path(tiny_model_dir) / "zerotune_tiny.json").read_text())["params"]
    assert count_params(str(tiny_model_dir)) == recorded
    assert count_params(str(tmp_path)) is None


def test_classic_mistakes_are_warned(tiny_model_dir, tmp_path, make_cfg, capsys):
    rows = qa_rows(40)
    same_question = [{"question": "What is a p-value, in plain words?", "answer": f"Answer variant {i}: " + r["answer"]}
                     for i, r in enumerate(qa_rows(60, seed=1))]
    long_rows = [{"question": f"Long {i}?", "answer": "many words here " * 120} for i in range(10)]
    data = write_csv(tmp_path / "qa.csv", rows + rows[:20] + same_question + long_rows)
    manifest = prepare(make_cfg([data], validation_fraction=0.2, test_fraction=0.2), str(tiny_model_dir))
    report = json.loads((Path(manifest["settings"]["output_dir"]) / "report.json").read_text())
    warnings = "\n".join(report["warnings"])
    assert sum(report["cross_split_prompt_overlap"].values()) >= 1
    assert "prompts shared across splits" in warnings
    assert "high duplicate rate: 20 of 130" in warnings
    assert report["redundant_context"]["largest_groups"][0] == 60 and "redundant context" in warnings
    truncated = sum(s["truncated_documents"] for s in manifest["splits"].values())
    assert truncated >= 10 and f"many over-length rows: {truncated} rows" in warnings
    assert "small fine-tuning set" in warnings
    printed = capsys.readouterr().out
    assert "warning: high duplicate rate" in printed and "train" in printed


def test_loose_key_ignores_case_spacing_and_punctuation_only():
    from data_prep.clean import loose_key

    assert loose_key("what is a  P-value? ") == loose_key("What is a p-value?")
    assert loose_key("What is a p-value?") != loose_key("What is a q-value?")


def test_near_duplicates_counts_repeats_beyond_the_first():
    from data_prep.report import near_duplicates

    assert near_duplicates(np.array([5, 5, 5, 9, 2])) == {"rows": 2, "share": 0.4}
    assert near_duplicates(np.array([1, 2, 3]))["rows"] == 0


def test_bundled_sample_report_names_its_near_duplicate(tiny_model_dir, sample_csv, make_cfg):
    cfg = make_cfg([str(sample_csv)], prompt_column="question", response_column="answer",
                   record_type="prompt_response")
    manifest = prepare(cfg, str(tiny_model_dir))
    report = json.loads((Path(manifest["settings"]["output_dir"]) / "report.json").read_text())
    # The sample holds "what is a  P-value? " with the same answer as "What is a p-value?": kept by exact
    # deduplication (the text differs), named by the report.
    assert report["near_duplicates"]["rows"] == 1
    assert any(w.startswith("near-duplicates: 1 kept rows") for w in report["warnings"])
