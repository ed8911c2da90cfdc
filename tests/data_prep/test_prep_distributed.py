"""Distributed prep (data_prep/distributed.py): the output does not depend on how many workers ran it or in
which order, a killed or failed unit is run again to the same bytes, and the manifest never appears over
unfinished units. The single-process prep is the reference for everything but the packing."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from prep_data import write_csv

from data_prep.config import DataConfig
from data_prep.distributed import (LAYOUT, finish_step, prepare_distributed, split_step, units_step,
                                   work_root)
from data_prep.errors import DataError
from data_prep.format import SPLITS, Shard, verify_shards
from data_prep.pipeline import prepare
from data_prep.units import missing_units, unit_of, units_of_worker

NUM_UNITS = 4


def _cfg(sample_csv: Path, out: Path, **overrides) -> DataConfig:
    base = {"sources": [str(sample_csv)], "output_dir": str(out), "seq_len": 256, "prompt_column": "question",
            "response_column": "answer", "validation_fraction": 0.1, "test_fraction": 0.1, "num_shards": NUM_UNITS}
    return DataConfig(**{**base, **overrides})


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every shard file's bytes and the report, by relative path (the manifest is compared as a dict)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and (p.suffix == ".npy" or p.name == "report.json")}


def comparable(manifest: dict) -> dict:
    """A manifest without what may differ between two runs of the same prep: time and output folder."""
    out = {k: v for k, v in manifest.items() if k != "created_at"}
    out["settings"] = {k: v for k, v in manifest["settings"].items() if k != "output_dir"}
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir, sample_csv, tmp_path_factory):
    """The bundled sample prepared in the unit layout by one worker, all steps in this process."""
    cfg = _cfg(sample_csv, tmp_path_factory.mktemp("one-worker") / "prepared")
    manifest = prepare_distributed(cfg, str(tiny_model_dir))
    return cfg, manifest, folder_bytes(Path(cfg.output_dir))


def test_units_partition_the_documents_and_the_workers_partition_the_units():
    hashes = np.random.default_rng(0).integers(-2**63, 2**63 - 1, size=10_000, dtype=np.int64)
    units = unit_of(hashes, 7)
    assert np.array_equal(units, unit_of(hashes.copy(), 7)) and set(units.tolist()) == set(range(7))
    assert np.bincount(units).min() > 10_000 / 7 * 0.9, "units get similar numbers of documents"
    for workers in (1, 2, 3, 7, 9):
        owned = sorted(u for w in range(workers) for u in units_of_worker(w, workers, 7))
        assert owned == list(range(7)), f"{workers} workers run every unit exactly once"


def test_two_workers_in_reverse_order_write_the_same_bytes(reference, tiny_model_dir, sample_csv, tmp_path):
    cfg1, manifest1, bytes1 = reference
    cfg = _cfg(sample_csv, tmp_path / "prepared")
    split_step(cfg, str(tiny_model_dir))
    assert units_step(cfg, str(tiny_model_dir), worker=1, workers=2) == [1, 3]
    assert units_step(cfg, str(tiny_model_dir), worker=0, workers=2) == [0, 2]
    manifest = finish_step(cfg, str(tiny_model_dir))
    assert comparable(manifest) == comparable(manifest1)
    assert folder_bytes(Path(cfg.output_dir)) == bytes1
    assert manifest["packing_scope"] == LAYOUT
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == [f"shard-{u:05d}" for u in range(NUM_UNITS)]
    verify_shards(cfg.output_dir)
    assert not work_root(Path(cfg.output_dir)).exists(), "the work folder is removed once published"


def _documents(data_dir: Path, manifest: dict, split: str) -> list[tuple]:
    """Every document of a split as (input_ids, labels) bytes, sorted (packing order left out)."""
    docs = []
    for info in manifest["splits"][split]["shards"]:
        shard = Shard.open(data_dir, split, info["name"])
        for i in range(len(shard)):
            ids, labels, pos = (np.asarray(a) for a in shard.sequence(i))
            starts = np.flatnonzero(pos == 0).tolist() + [len(ids)]
            docs.extend((ids[a:b].tobytes(), labels[a:b].tobytes()) for a, b in zip(starts, starts[1:]))
    return sorted(docs)


def test_same_documents_and_report_as_the_single_process_prep(reference, tiny_model_dir, sample_csv, tmp_path):
    """Dedup, split, drops and the report are global steps: only the packing may differ from one global packer."""
    cfg1, manifest1, _ = reference
    cfg = _cfg(sample_csv, tmp_path / "global")
    manifest = prepare(cfg, str(tiny_model_dir))
    assert manifest["cache_key"] != manifest1["cache_key"], "the layout is part of the cache key"
    packing_keys = ("sequences", "packing_efficiency", "shards")
    for split in SPLITS:
        plain = {k: v for k, v in manifest["splits"][split].items() if k not in packing_keys}
        assert plain == {k: v for k, v in manifest1["splits"][split].items() if k not in packing_keys}
        assert _documents(Path(cfg.output_dir), manifest, split) == _documents(Path(cfg1.output_dir), manifest1, split)
    report = load_report(cfg.output_dir)
    report1 = load_report(cfg1.output_dir)
    for key in ("document_lengths", "cross_split_prompt_overlap", "redundant_context", "near_duplicates", "sources"):
        assert report[key] == report1[key], key
    assert manifest1["splits"]["train"]["packing_efficiency"] >= 0.9


def load_report(data_dir) -> dict:
    import json

    return json.loads((Path(data_dir) / "report.json").read_text())


def _run_units_in_child(cfg, model: str) -> None:
    units_step(cfg, model, worker=1, workers=2)


def test_a_killed_worker_leaves_no_manifest_and_a_rerun_gives_the_same_bytes(reference, tiny_model_dir,
                                                                              sample_csv, tmp_path):
    _, manifest1, bytes1 = reference
    cfg = _cfg(sample_csv, tmp_path / "prepared")
    split_step(cfg, str(tiny_model_dir))
    units_step(cfg, str(tiny_model_dir), worker=0, workers=2)
    units_root = work_root(Path(cfg.output_dir)) / "units"
    child = multiprocessing.get_context("fork").Process(target=_run_units_in_child, args=(cfg, str(tiny_model_dir)))
    child.start()
    deadline = time.monotonic() + 120
    while not list(units_root.glob(".unit-00001.tmp-*")) and time.monotonic() < deadline and child.is_alive():
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)  # mid-unit: its temporary folder exists, its unit is not finished
    child.join()
    assert list(units_root.glob(".unit-00001.tmp-*")), "the worker was killed inside unit 1"
    assert 1 in missing_units(units_root, NUM_UNITS)
    with pytest.raises(DataError, match=r"prep units are not finished \(unit 1(, 3| and 3)?; their worker failed "
                                        r"or was killed\).*finished units are kept and only these run"):
        finish_step(cfg, str(tiny_model_dir))
    assert not Path(cfg.output_dir).exists(), "nothing looks complete before every unit is"
    before = missing_units(units_root, NUM_UNITS)
    assert units_step(cfg, str(tiny_model_dir), worker=0, workers=1) == before, "a re-run runs only the missing units"
    manifest = finish_step(cfg, str(tiny_model_dir))
    assert comparable(manifest) == comparable(manifest1)
    assert folder_bytes(Path(cfg.output_dir)) == bytes1


def test_a_failing_unit_names_itself_and_the_row_and_keeps_the_finished_units(tiny_model_dir, tmp_path):
    rows = [{"question": f"Q{i}: why?", "answer": f"Because {i}."} for i in range(40)]
    rows.append({"question": "Long?", "answer": "word " * 400})
    path = write_csv(tmp_path / "qa.csv", rows)
    cfg = _cfg(path, tmp_path / "prepared", excess_length="error")
    split_step(cfg, str(tiny_model_dir))
    pattern = (r"prep unit (\d) of 4 \(\d+ documents from qa\.csv\) failed: \S*qa\.csv: data row 41 .*more than "
               r"data\.seq_len 256.*Units finished so far are kept")
    with pytest.raises(DataError, match=pattern) as info:
        units_step(cfg, str(tiny_model_dir))
    assert info.value.user_error
    bad_unit = int(re.search(r"prep unit (\d)", str(info.value)).group(1))
    units_root = work_root(Path(cfg.output_dir)) / "units"
    assert missing_units(units_root, NUM_UNITS) == list(range(bad_unit, NUM_UNITS)), "the units before it are kept"
    assert not list(units_root.glob(".unit-*.tmp-*")), "a unit that failed cleanly leaves no temporary folder"
    with pytest.raises(DataError, match="not finished"):
        finish_step(cfg, str(tiny_model_dir))
    assert not Path(cfg.output_dir).exists()
    shutil.rmtree(work_root(Path(cfg.output_dir)))


def test_more_units_than_documents(tiny_model_dir, tmp_path):
    rows = [{"question": f"What is {c}?", "answer": f"It is {c}."} for c in "abc"]
    cfg = _cfg(write_csv(tmp_path / "qa.csv", rows), tmp_path / "prepared", num_shards=8, validation_fraction=0.0,
               test_fraction=0.0)
    manifest = prepare_distributed(cfg, str(tiny_model_dir))
    train = manifest["splits"]["train"]
    assert train["documents"] == 3 and 1 <= len(train["shards"]) <= 3
    assert sum(s["sequences"] for s in train["shards"]) == train["sequences"]
    verify_shards(cfg.output_dir)
