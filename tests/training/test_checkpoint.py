"""Finding a checkpoint to resume from, pruning, RNG state round trip."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from training import checkpoint as ckpt


def _make(root, step, complete=True):
    folder = root / ckpt.tag_for_step(step)
    folder.mkdir(parents=True)
    (folder / ckpt.STATE_FILE).write_text("{}")
    if complete:
        (folder / ckpt.COMPLETE_MARKER).touch()
    return folder.name


def test_latest_pointer_is_used_when_it_names_a_complete_checkpoint(tmp_path):
    _make(tmp_path, 2)
    tag4 = _make(tmp_path, 4)
    ckpt.write_pointer(tmp_path, "latest", ckpt.tag_for_step(2))
    assert ckpt.find_resume_tag(tmp_path) == (ckpt.tag_for_step(2), [])
    ckpt.write_pointer(tmp_path, "latest", tag4)
    assert ckpt.find_resume_tag(tmp_path)[0] == tag4


def test_incomplete_checkpoint_is_skipped_with_a_warning(tmp_path):
    tag2 = _make(tmp_path, 2)
    _make(tmp_path, 4, complete=False)
    ckpt.write_pointer(tmp_path, "latest", tag2)
    tag, notes = ckpt.find_resume_tag(tmp_path)
    assert tag == tag2 and "step-00000004" in notes[0] and "incomplete" in notes[0]


def test_corrupt_or_missing_latest_falls_back_to_newest_complete(tmp_path):
    assert ckpt.find_resume_tag(tmp_path) == (None, [])
    _make(tmp_path, 2)
    tag4 = _make(tmp_path, 4)
    _make(tmp_path, 6, complete=False)
    (tmp_path / "latest").write_bytes(b"\xff\x00garbage")
    tag, notes = ckpt.find_resume_tag(tmp_path)
    assert tag == tag4 and any("latest" in n for n in notes)
    (tmp_path / "latest").unlink()
    assert ckpt.find_resume_tag(tmp_path)[0] == tag4


def test_prune_keeps_last_and_best_and_drops_stale_incomplete(tmp_path):
    tags = [_make(tmp_path, s) for s in (1, 2, 3, 4, 5)]
    stale = _make(tmp_path, 0, complete=False)
    ckpt.prune(tmp_path, keep_last=2, keep_tags={tags[0]})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [tags[0], tags[3], tags[4]]
    assert stale not in left
    newer_incomplete = _make(tmp_path, 9, complete=False)
    ckpt.prune(tmp_path, keep_last=2, keep_tags=set())
    assert (tmp_path / newer_incomplete).is_dir()  # may be a save in progress: never deleted


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    ckpt.save_rng_state(tmp_path / "rng.safetensors")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    ckpt.load_rng_state(tmp_path / "rng.safetensors")
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_resume_splits_decay_reads_the_checkpoint_a_resume_would_load(tmp_path):
    root = tmp_path / "checkpoints"
    assert ckpt.resume_splits_decay(root) is None  # no run yet
    tag2 = _make(root, 2)  # a state file without the field: written before it existed, always split
    assert ckpt.resume_splits_decay(root) is True
    tag4 = _make(root, 4)
    (root / tag4 / ckpt.STATE_FILE).write_text(json.dumps({"optimizer_param_groups": 1}))
    assert ckpt.resume_splits_decay(root) is False  # the newest complete one, as the resume picks
    _make(root, 6, complete=False)
    assert ckpt.resume_splits_decay(root) is False
    ckpt.write_pointer(root, "latest", tag2)
    assert ckpt.resume_splits_decay(root) is True  # latest names the older one: that is what loads
    (root / tag2 / ckpt.STATE_FILE).write_text("[]")
    assert ckpt.resume_splits_decay(root) is None  # unreadable: the resume itself reports it


def test_rng_state_captured_earlier_is_what_gets_saved(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    before = ckpt.capture_rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.save_rng_state(tmp_path / "rng.safetensors", before)  # the draws above are not in it
    ckpt.load_rng_state(tmp_path / "rng.safetensors")
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_complete_marker_written_only_after_every_file_and_the_folder_are_flushed(tmp_path, monkeypatch):
    folder = tmp_path / "step-00000001"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.pt", "b.safetensors", "sub/c.pt"):
        (folder / name).write_bytes(b"x")
    calls = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        calls.append((path.relative_to(tmp_path).as_posix(), (folder / ckpt.COMPLETE_MARKER).exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    ckpt.mark_complete(folder)
    before_marker = {path for path, marker_exists in calls if not marker_exists}
    assert before_marker == {"step-00000001/a.pt", "step-00000001/b.safetensors", "step-00000001/sub/c.pt",
                             "step-00000001/sub", "step-00000001"}
    after_marker = [path for path, marker_exists in calls if marker_exists]
    assert after_marker == ["step-00000001/COMPLETE", "step-00000001"], "the marker itself must be flushed"


def test_prune_takes_a_checkpoints_universal_form_with_it(tmp_path):
    tags = [_make(tmp_path, s) for s in (1, 2, 3)]
    for tag in tags:
        ckpt.universal_folder(tmp_path, tag).mkdir()
    ckpt.prune(tmp_path, keep_last=1, keep_tags=set())
    assert sorted(p.name for p in tmp_path.iterdir()) == [tags[2], f"{tags[2]}-universal"]


def test_a_folder_deepspeed_cannot_convert_is_one_error_naming_it_and_leaves_nothing(tmp_path):
    tag = _make(tmp_path, 4)  # complete by our markers, but no DeepSpeed files in it
    with pytest.raises(ckpt.ResumeError) as err:
        ckpt.convert_to_universal(tmp_path, tag, saved_world_size=2)
    text = str(err.value)
    assert str(tmp_path / tag) in text and "resume with 2 data-parallel ranks" in text
    assert not ckpt.universal_folder(tmp_path, tag).exists()
    assert not (tmp_path / ckpt.UNIVERSAL_STAGING).exists()


def test_a_finished_universal_form_is_reused(tmp_path):
    tag = _make(tmp_path, 4)
    done = ckpt.universal_folder(tmp_path, tag)
    done.mkdir()
    (done / ckpt.COMPLETE_MARKER).touch()
    assert ckpt.convert_to_universal(tmp_path, tag, saved_world_size=2) == done  # no conversion attempted


def test_save_times_record_the_last_save(tmp_path):
    assert ckpt.last_save_time(tmp_path) is None
    ckpt.record_save_time(tmp_path, "step-00000002", 1.25)
    ckpt.record_save_time(tmp_path, "step-00000004", 3.5)
    assert ckpt.last_save_time(tmp_path) == ("step-00000004", 3.5)
