"""Memory flat in the data size: released mapped pages change no output, and they really are released."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from prep_data import write_jsonl

import data_prep.pipeline as pipeline
from data_prep.pages import PageReleaser, read_only_mappings, release_free_heap
from data_prep.pipeline import prepare


def _rss_kib(kind: str = "RssFile") -> int:
    with open(f"/proc/{os.getpid()}/status", encoding="utf-8") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(f"{kind}:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="page release works through /proc (Linux)")
def test_released_pages_leave_resident_memory_and_read_back_the_same(tmp_path):
    import pyarrow as pa

    data = np.arange(16 * 2**20, dtype=np.int32)  # 64 MiB
    (tmp_path / "a.bin").write_bytes(data.tobytes())
    source = pa.memory_map(str(tmp_path / "a.bin"), "r")
    view = np.frombuffer(source.read_buffer(), dtype=np.int32)
    assert int(view.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page read
    before = _rss_kib()
    PageReleaser([tmp_path])()
    after = _rss_kib()
    assert before - after > 48 * 1024, f"RssFile {before} KiB -> {after} KiB: the mapped pages stayed resident"
    assert np.array_equal(view, data)  # a released page reads back from the file


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from /proc (Linux)")
def test_freed_heap_pages_go_back_to_the_system():
    # 16 KiB blocks (malloc'd below the mmap threshold) each followed by a small survivor: once the blocks
    # are freed, the survivors pin the heap, so free() gives nothing back until the heap is trimmed.
    pairs = [(bytes([i % 251]) * 16384, bytes([i % 7]) * 600) for i in range(8000)]
    survivors = [small for _, small in pairs]
    del pairs
    before = _rss_kib("RssAnon")
    release_free_heap()
    after = _rss_kib("RssAnon")
    assert before - after > 40 * 1024, f"RssAnon {before} KiB -> {after} KiB: freed heap pages kept"
    assert all(s == bytes([i % 7]) * 600 for i, s in enumerate(survivors))


def test_only_read_only_mappings_under_the_roots_are_released():
    maps = ("7f00-7f10 r--s 00000000 fd:01 1 /data/run/_cache/tokenize.arrow\n"
            "7f10-7f20 rw-s 00000000 fd:01 2 /data/run/shard.npy\n"
            "7f20-7f30 r--p 00000000 fd:01 3 /data/runner/other.arrow\n"
            "7f30-7f40 rw-p 00000000 00:00 0\n"
            "7f40-7f50 r-xp 00000000 fd:01 4 /usr/lib/libc.so\n")
    assert read_only_mappings(("/data/run/",), maps) == [(0x7F00, 0x7F10)]


def test_streaming_stages_keep_counts_drop_reasons_and_bytes(tiny_model_dir, sample_csv, tmp_path, make_cfg,
                                                             monkeypatch):
    # Equivalence: pages released after every batch vs never released. Bad rows, empty fields,
    # duplicates (the bundled sample has both) and too-long rows (seq_len 96, excess_length drop) all occur.
    bad = write_jsonl(tmp_path / "mixed.jsonl", [{"question": "What is a tensor?", "answer": "An array."},
                                                 {"question": 5}, {"prompt": "x"}])
    # One process (num_proc 1): the releases under test happen in this process.
    cfg = lambda out: make_cfg([sample_csv, bad], output_dir=str(tmp_path / out), seq_len=96,  # noqa: E731
                               excess_length="drop", map_batch_size=50, num_proc=1)
    streamed = prepare(cfg("streamed"), str(tiny_model_dir))
    monkeypatch.setattr(pipeline, "PageReleaser", lambda roots: PageReleaser([]))
    plain = prepare(cfg("plain"), str(tiny_model_dir))
    strip = lambda m: {k: v for k, v in m.items() if k not in ("created_at", "settings")}  # noqa: E731
    assert strip(streamed) == strip(plain)
    drops = {r: sum(s["rows_dropped"][r] for s in streamed["splits"].values()) for r in pipeline.DROP_REASONS}
    assert drops["bad_row"] >= 1 and drops["empty_field"] >= 1 and drops["duplicate"] >= 1 and drops["too_long"] >= 1
    reports = [json.loads((tmp_path / out / "report.json").read_text()) for out in ("streamed", "plain")]
    assert reports[0] == reports[1]


# Rows a CSV reader can get wrong: missing-value words and empty cells (null, as pandas reads them), quoted
# commas, quotes and line breaks, numbers kept as text, a blank line, a short row, a BOM before the header.
_AWKWARD_CSV = ('\ufeffquestion,answer,extra\n'
                'What is NA?,NA,1\n'
                '"Commas, here","He said ""yes""\nand left",\n'
                '\n'
                '42,007,3.50\n'
                'Short row,only two\n'
                'None,null,""\n' + "".join(f"Q{i},A{i} \u00e9\u0301,{i}\n" for i in range(40)))


def test_batched_csv_reader_reads_the_rows_datasets_from_csv_reads(tmp_path, monkeypatch):
    # Equivalence: the batched reader (batches of 4 rows, so batches split the awkward rows) vs
    # datasets.Dataset.from_csv with every column as text, the reader prep used before.
    import datasets

    import data_prep.readers as readers

    path = tmp_path / "awkward.csv"
    path.write_text(_AWKWARD_CSV, encoding="utf-8")
    monkeypatch.setattr(readers, "CSV_BATCH_ROWS", 4)
    batched = readers.read_csv_streaming(path, tmp_path / "cache")
    features = datasets.Features({name: datasets.Value("string") for name in ("question", "answer", "extra")})
    reference = datasets.Dataset.from_csv(str(path), features=features, encoding="utf-8-sig",
                                          cache_dir=str(tmp_path / "ref"))
    assert batched.column_names == reference.column_names == ["question", "answer", "extra"]
    assert batched.features == reference.features
    assert batched.to_list() == reference.to_list()
    assert len(batched) == 45 and batched[0]["answer"] is None and batched[2]["answer"] == "007"


def test_token_rows_read_scattered_documents_as_a_selection_does(tmp_path):
    # Equivalence: documents read from the file at their buffers' offsets vs Dataset.select(rows) (the slow,
    # obvious reading), over a file written in chunks of 3 rows, rows in a scattered order with a repeat.
    import datasets

    from data_prep.shards import TokenRows

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, rng.integers(0, 9)).astype(np.int32) for _ in range(20)]
    base = datasets.Dataset.from_dict({"n": list(range(20))})
    ds = base.map(lambda b: {"input_ids": [docs[i] for i in b["n"]], "labels": [-docs[i] for i in b["n"]]},
                  batched=True, batch_size=3, writer_batch_size=3, cache_file_name=str(tmp_path / "tok.arrow"))
    assert ds.data.table.column("input_ids").num_chunks > 1
    rows = np.array([17, 3, 3, 0, 19, 8, 11, 5])
    with TokenRows([tmp_path / "tok.arrow"]) as tokens:
        for name in ("input_ids", "labels"):
            flat, lens = tokens.read(name, rows)
            expected = ds.select(rows)[name]
            assert flat.tolist() == [t for doc in expected for t in doc]
            assert lens.tolist() == [len(doc) for doc in expected]


def test_page_releaser_with_a_step_releases_only_after_that_much_growth(tmp_path, monkeypatch):
    releaser = PageReleaser([tmp_path], step_bytes=64 * 2**20)
    calls = []
    monkeypatch.setattr(releaser, "release", lambda: calls.append(1))
    releaser()
    releaser()
    assert len(calls) == 1  # the first call releases, the second finds no growth
    grown = np.ones(80 * 2**20, dtype=np.uint8)  # 80 MiB resident
    releaser()
    assert len(calls) == 2 and grown.sum() == len(grown)


def test_column_reads_release_after_every_batch_and_read_the_same():
    import datasets

    values = np.arange(250_000, dtype=np.int64) * 7 % 1000
    ds = datasets.Dataset.from_dict({"n": values, "s": np.where(values % 3 == 0, "a", "b").tolist()})
    calls = []
    release = lambda: calls.append(1)  # noqa: E731
    assert np.array_equal(pipeline.column(ds, "n", release), values) and len(calls) == 3  # 100,000-row batches
    assert np.array_equal(pipeline.equals(ds, "s", "a", release), values % 3 == 0) and len(calls) == 6
    assert np.array_equal(pipeline.column(ds.select([5, 2]), "n"), values[[5, 2]])


def test_column_reads_of_selected_rows_read_what_indexing_the_whole_column_reads():
    import datasets

    values = np.arange(250_000, dtype=np.int64) * 7 % 1000
    ds = datasets.Dataset.from_dict({"n": values, "s": np.where(values % 3 == 0, "a", "b").tolist()})
    rng = np.random.default_rng(0)
    for rows in (np.sort(rng.choice(len(values), 1_234, replace=False)).astype(np.int32),  # across batches
                 np.array([0, 99_999, 100_000, 249_999]), np.arange(100_000, 200_000), np.zeros(0, dtype=np.int32)):
        got = pipeline.column(ds, "n", rows=rows)
        assert got.dtype == np.int64 and np.array_equal(got, values[rows])
        assert np.array_equal(pipeline.equals(ds, "s", "a", rows=rows), values[rows] % 3 == 0)
    assert pipeline.row_index_dtype(2**31 - 1) == np.int32 and pipeline.row_index_dtype(2**31) == np.int64
