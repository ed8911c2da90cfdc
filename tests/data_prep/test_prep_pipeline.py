"""End-to-end prep runs: round trip through the shard reader, determinism, cache, inputs of every kind."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_prep.clean import normalize_text
from data_prep.config import DataConfig
from data_prep.format import IGNORE_INDEX, SPLITS, Shard, load_manifest, verify_shards
from data_prep.pipeline import prepare

from prep_data import qa_rows, write_csv, write_jsonl


def _documents(data_dir, manifest):
    """Every document in the shards as (input_ids, labels), split at position_ids == 0."""
    docs = []
    for split in SPLITS:
        for info in manifest["splits"][split]["shards"]:
            shard = Shard.open(data_dir, split, info["name"])
            for i in range(len(shard)):
                ids, labels, pos = (np.asarray(a) for a in shard.sequence(i))
                starts = np.flatnonzero(pos == 0).tolist() + [len(ids)]
                assert starts[0] == 0 and (np.diff(pos[starts[0]:]) != 1).sum() == len(starts) - 2
                docs.extend((ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:]))
                assert (labels[starts[:-1]] == IGNORE_INDEX).all(), "a document's first token is never a target"
    return docs


@pytest.fixture(scope="module")
def bundled(tiny_model_dir, sample_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled") / "prepared"
    cfg = DataConfig(sources=[str(sample_csv)], output_dir=str(out), seq_len=512, prompt_column="question",
                     response_column="answer", validation_fraction=0.1, test_fraction=0.1, num_shards=2)
    return cfg, prepare(cfg, str(tiny_model_dir))


def test_bundled_data_packs_tightly_and_verifies(bundled):
    cfg, manifest = bundled
    assert manifest["splits"]["train"]["packing_efficiency"] >= 0.95
    assert load_manifest(cfg.output_dir) == manifest
    verify_shards(cfg.output_dir)
    drops = {r: sum(s["rows_dropped"][r] for s in manifest["splits"].values()) for r in
             ("empty_field", "duplicate")}
    assert drops["duplicate"] >= 3 and drops["empty_field"] >= 1  # the sample's deliberate flaws
    for split in manifest["splits"].values():
        assert split["rows_read"] == split["documents"] + sum(split["rows_dropped"].values())
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"])
        assert len(split["shards"]) == min(2, split["sequences"])


def test_round_trip_text_and_prompt_masks(bundled, tiny_model_dir, sample_csv):
    import csv

    cfg, manifest = bundled
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with open(sample_csv, newline="", encoding="utf-8") as fh:
        rows = [(normalize_text(r["question"]), normalize_text(r["answer"])) for r in csv.DictReader(fh)]
    expected = {}
    for q, a in rows:
        if q and a:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            expected[tok.apply_chat_template(msgs, tokenize=False)] = tok.apply_chat_template(
                msgs[:1], tokenize=False, add_generation_prompt=True)
    docs = _documents(cfg.output_dir, manifest)
    assert len(docs) == sum(s["documents"] for s in manifest["splits"].values())
    seen = set()
    for ids, labels in docs:
        text = tok.decode(ids)
        assert text in expected, f"shard document is not a templated row: {text[:80]!r}"
        seen.add(text)
        k = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
        assert tok.decode(ids[:k]) == expected[text], "masked tokens are exactly the prompt"
        eos_at = int(np.flatnonzero(ids == tok.eos_token_id)[-1])
        assert np.array_equal(labels[k:eos_at + 1], ids[k:eos_at + 1]), "the response and its EOS are trained on"
        assert (labels[eos_at + 1:] == IGNORE_INDEX).all() and not tok.decode(ids[eos_at + 1:]).strip()
    assert len(seen) == len(docs), "no document twice (dedup)"


def test_report_files(bundled):
    cfg, manifest = bundled
    report = json.loads((Path(cfg.output_dir) / "report.json").read_text())
    assert report["document_lengths"]["documents"] == sum(s["documents"] for s in manifest["splits"].values())
    assert any("small fine-tuning set" in w for w in report["warnings"])
    png = (Path(cfg.output_dir) / "lengths.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_determinism_and_cache(tiny_model_dir, qa_csv, make_cfg, capsys):
    cfg = make_cfg([qa_csv])
    first = prepare(cfg, str(tiny_model_dir))
    capsys.readouterr()
    again = prepare(cfg, str(tiny_model_dir))
    assert "up to date" in capsys.readouterr().out and again["created_at"] == first["created_at"]
    rebuilt = prepare(cfg, str(tiny_model_dir), force=True)
    strip = lambda m: {k: v for k, v in m.items() if k != "created_at"}  # noqa: E731
    assert strip(rebuilt) == strip(first)
    verify_shards(cfg.output_dir)


@pytest.mark.parametrize("change", ["input", "setting", "tokenizer"])
def test_rebuild_when_anything_changes(tiny_model_copy, tmp_path, make_cfg, change, capsys):
    data = write_csv(tmp_path / "qa.csv", qa_rows(60))
    cfg = make_cfg([data])
    first = prepare(cfg, str(tiny_model_copy))
    if change == "input":
        write_csv(data, qa_rows(61))
    elif change == "setting":
        cfg = make_cfg([data], seq_len=300)
    else:
        tok = AutoTokenizer.from_pretrained(tiny_model_copy)
        tok.chat_template = tok.chat_template + "{# edited #}"  # renders the same, but is another template
        tok.save_pretrained(tiny_model_copy)
    capsys.readouterr()
    second = prepare(cfg, str(tiny_model_copy))
    assert "up to date" not in capsys.readouterr().out
    assert second["cache_key"] != first["cache_key"]
    assert load_manifest(cfg.output_dir)["cache_key"] == second["cache_key"]
    if change == "input":
        assert sum(s["rows_read"] for s in second["splits"].values()) == 61


def test_unpacked_one_document_per_sequence(tiny_model_dir, qa_csv, make_cfg):
    cfg = make_cfg([qa_csv], packing=False)
    manifest = prepare(cfg, str(tiny_model_dir))
    for split in SPLITS:
        info = manifest["splits"][split]
        assert info["sequences"] == info["documents"]
        for sh in info["shards"]:
            shard = Shard.open(cfg.output_dir, split, sh["name"])
            assert all((np.asarray(shard.sequence(i)[2]) == 0).sum() == 1 for i in range(len(shard)))


def test_messages_jsonl(tiny_model_dir, tmp_path, make_cfg):
    convs = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}"},
                           {"role": "user", "content": "Define recall"},
                           {"role": "assistant", "content": f"TP over TP plus FN, case {i}"}]} for i in range(40)]
    manifest = prepare(make_cfg([write_jsonl(tmp_path / "chat.jsonl", convs)]), str(tiny_model_dir))
    assert manifest["record_type"] == "messages"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for ids, labels in _documents(tmp_path / "prepared", manifest):
        sup = tok.decode(ids[labels != IGNORE_INDEX])
        assert "Hello" in sup and "TP over TP" in sup and "Define recall" not in sup


def test_text_parquet_and_save_to_disk_and_folder_inputs(tiny_model_dir, tmp_path, make_cfg):
    import datasets

    texts = [{"text": f"Document {i}: " + r["answer"]} for i, r in enumerate(qa_rows(60))]
    datasets.Dataset.from_list(texts[:20]).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(texts[20:40]).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "b.jsonl", texts[40:])
    saved_files = sorted(p.name for p in (tmp_path / "saved").iterdir())
    cfg = make_cfg([tmp_path / "a.parquet", tmp_path / "saved", tmp_path / "folder"], record_type="auto", seq_len=512)
    manifest = prepare(cfg, str(tiny_model_dir))
    assert manifest["record_type"] == "text"
    assert sum(s["rows_read"] for s in manifest["splits"].values()) == 60
    assert sum(s["documents"] for s in manifest["splits"].values()) == 60
    assert sum(s["truncated_documents"] for s in manifest["splits"].values()) == 0
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == saved_files, "inputs are never written to"
    for ids, labels in _documents(cfg.output_dir, manifest):
        assert (labels[1:] == ids[1:]).all() and ids[-1] == AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id


def test_output_replaces_old_folder_only_when_complete(tiny_model_dir, qa_csv, make_cfg):
    cfg = make_cfg([qa_csv])
    prepare(cfg, str(tiny_model_dir))
    parent = Path(cfg.output_dir).parent
    prepare(make_cfg([qa_csv], seq_len=200), str(tiny_model_dir))
    assert load_manifest(cfg.output_dir)["seq_len"] == 200
    assert sorted(p.name for p in parent.iterdir() if p.name.startswith(".")) == [], "no temporary folders left"
    shutil.rmtree(cfg.output_dir)


def test_worker_processes_give_identical_output(tiny_model_dir, qa_csv, make_cfg, monkeypatch, capsys):
    # data.num_proc auto on 2 usable CPUs with 12 batches of 17 rows forks 2 workers (datasets' progress bar
    # says so) and writes what one process writes.
    from data_prep import procs

    report = lambda cfg: json.loads((Path(cfg.output_dir) / "report.json").read_text())  # noqa: E731
    single_cfg = make_cfg([qa_csv], num_proc=1, map_batch_size=64)
    single = prepare(single_cfg, str(tiny_model_dir))
    single_report = report(single_cfg)
    capsys.readouterr()
    monkeypatch.setattr(procs, "usable_cpus", lambda: (2, "2 usable CPUs"))
    multi_cfg = make_cfg([qa_csv], num_proc="auto", map_batch_size=17)
    multi = prepare(multi_cfg, str(tiny_model_dir), force=True)
    out, err = capsys.readouterr()
    assert "zerotune prep: 2 processes (data.num_proc auto: 2 usable CPUs)" in out
    assert "clean qa.csv (num_proc=2)" in err and "template + tokenize (num_proc=2)" in err
    strip = lambda m: {k: v for k, v in m.items() if k not in ("created_at", "settings")}  # noqa: E731
    assert strip(multi) == strip(single) and report(multi_cfg) == single_report


def test_csv_cells_are_text_and_a_bom_is_not_part_of_a_name(tiny_model_dir, tmp_path, make_cfg):
    rows = "".join(f"What is {i} + {i}?,{2 * i}\n" for i in range(30))
    path = tmp_path / "numbers.csv"
    path.write_bytes(b"\xef\xbb\xbf" + f"question,answer\n{rows}".encode())
    manifest = prepare(make_cfg([path], record_type="prompt_response"), str(tiny_model_dir))
    assert sum(s["documents"] for s in manifest["splits"].values()) == 30


def test_a_killed_runs_temporary_folder_is_removed(tiny_model_dir, qa_csv, make_cfg):
    import socket
    import subprocess
    import sys

    cfg = make_cfg([qa_csv])
    parent = Path(cfg.output_dir).parent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = parent / ".prepared.tmp-dead", parent / ".prepared.tmp-live"
    for folder, pid in ((stale, int(dead.stdout)), (live, os.getpid())):
        folder.mkdir()
        (folder / ".owner").write_text(f"{socket.gethostname()} {pid}")
    prepare(cfg, str(tiny_model_dir))
    assert not stale.exists() and live.exists(), "only a dead process's folder is removed"
    assert not (Path(cfg.output_dir) / ".owner").exists()


def test_format_template_round_trip(tiny_model_dir, tmp_path, make_cfg):
    rows = qa_rows(40)
    fmt = "### Question:\n{prompt}\n\n### Answer:\n{response}"
    cfg = make_cfg([write_csv(tmp_path / "qa.csv", rows)], template="format", format_string=fmt, seq_len=512)
    manifest = prepare(cfg, str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = {fmt.replace("{prompt}", r["question"]).replace("{response}", r["answer"]) + tok.eos_token:
                fmt.split("{response}")[0].replace("{prompt}", r["question"]) for r in rows}
    docs = _documents(cfg.output_dir, manifest)
    assert len(docs) == len(rows)
    for ids, labels in docs:
        text = tok.decode(ids)
        k = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
        assert text in expected and tok.decode(ids[:k]) == expected[text]
        assert np.array_equal(labels[k:], ids[k:]) and ids[-1] == tok.eos_token_id


def test_over_length_rows_dropped_and_counted(tiny_model_dir, qa_csv, make_cfg):
    cfg = make_cfg([qa_csv], seq_len=128, excess_length="drop")
    manifest = prepare(cfg, str(tiny_model_dir))
    too_long = sum(s["rows_dropped"]["too_long"] for s in manifest["splits"].values())
    assert too_long > 0
    assert sum(s["documents"] for s in manifest["splits"].values()) + too_long == 200
    for ids, _ in _documents(cfg.output_dir, manifest):
        assert len(ids) <= 128
