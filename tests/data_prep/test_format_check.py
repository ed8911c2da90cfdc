"""The cheap shard check train.py runs before any collective: sizes and .npy headers against the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from data_prep.format import ManifestError, check_shard_files, load_manifest


@pytest.fixture()
def prepared(tiny_model_dir, qa_csv, make_cfg) -> Path:
    from data_prep.pipeline import prepare

    cfg = make_cfg([qa_csv])
    prepare(cfg, tokenizer_path=str(tiny_model_dir))
    return Path(cfg.output_dir)


def test_intact_shards_pass(prepared):
    check_shard_files(prepared, load_manifest(prepared))


def test_truncated_shard_names_the_file_and_the_fix(prepared):
    path = prepared / "train" / "shard-00001.labels.npy"
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(ManifestError) as exc:
        check_shard_files(prepared, load_manifest(prepared))
    message = str(exc.value)
    assert message.startswith(f"{path}: has {path.stat().st_size} bytes, its header says {path.stat().st_size + 100}")
    assert "zerotune prep CONFIG --force" in message


def test_shard_from_another_prep_is_refused_by_its_header(prepared):
    path = prepared / "validation" / "shard-00000.offsets.npy"
    np.save(path, np.zeros(3, dtype=np.int64))  # a valid .npy file, of the wrong length
    manifest = load_manifest(prepared)
    expected = manifest["splits"]["validation"]["shards"][0]["sequences"] + 1
    with pytest.raises(ManifestError, match=rf"{path}: holds <i8\[3\], expected <i8\[{expected}\]"):
        check_shard_files(prepared, manifest)


def test_missing_and_garbage_files(prepared):
    manifest = load_manifest(prepared)
    path = prepared / "test" / "shard-00000.position_ids.npy"
    path.write_bytes(b"not a numpy file at all")
    with pytest.raises(ManifestError, match=rf"{path}: unreadable \.npy header"):
        check_shard_files(prepared, manifest)
    path.unlink()
    with pytest.raises(ManifestError, match=rf"{path}: missing"):
        check_shard_files(prepared, json.loads((prepared / "manifest.json").read_text()))
