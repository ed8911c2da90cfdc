"""`zerotune status`: which ranks are behind or silent, from heartbeat records alone."""

from __future__ import annotations

import json

import pytest

from launcher.cli import main
from launcher.status import rank_statuses, status

NOW = 1_000_000.0


def _beat(rank, step, phase, age_s, micro=0, host=None):
    return {"rank": rank, "world_size": 3, "host": host or f"node{rank}", "pid": 100 + rank, "step": step,
            "phase": phase, "micro": micro, "time": NOW - age_s}


def _flags(beats, **kw):
    return [(s.behind, s.silent) for s in rank_statuses(beats, NOW, **kw)]


def test_a_rank_left_in_an_earlier_phase_is_behind_the_waiting_ones_are_not():
    beats = [_beat(0, 5, "backward", 40), _beat(1, 5, "forward", 42), _beat(2, 5, "backward", 40)]
    assert _flags(beats, behind_after_s=10, silent_after_s=120) == [(False, False), (True, False), (False, False)]


def test_earlier_step_and_earlier_micro_batch_are_behind():
    beats = [_beat(0, 6, "data", 30), _beat(1, 5, "save", 30), _beat(2, 6, "data", 30)]
    assert _flags(beats, behind_after_s=10)[1] == (True, False)
    beats = [_beat(0, 6, "forward", 30, micro=2), _beat(1, 6, "step", 30, micro=1), _beat(2, 6, "forward", 30, micro=2)]
    assert _flags(beats, behind_after_s=10) == [(False, False), (True, False), (False, False)]


def test_a_passing_difference_is_not_flagged_and_a_long_silence_is():
    beats = [_beat(0, 5, "backward", 1), _beat(1, 5, "forward", 1), _beat(2, 5, "backward", 1)]
    assert _flags(beats, behind_after_s=10) == [(False, False)] * 3
    beats = [_beat(0, 5, "backward", 500), _beat(1, 5, "backward", 500), _beat(2, 5, "backward", 500)]
    assert _flags(beats, silent_after_s=120) == [(False, True)] * 3


def test_exited_ranks_are_never_flagged():
    beats = [_beat(0, 9, "exit", 900), _beat(1, 9, "exit", 900), _beat(2, 9, "exit", 900)]
    assert _flags(beats) == [(False, False)] * 3


def test_status_command_names_the_laggard_and_its_host(tmp_path, capsys):
    folder = tmp_path / "heartbeats"
    folder.mkdir()
    import time

    now = time.time()
    for beat in (_beat(0, 5, "backward", 40, host="zt-hosta"), _beat(1, 5, "forward", 42, host="zt-hostb"),
                 _beat(2, 5, "backward", 40, host="zt-hostc")):
        beat["time"] += now - NOW
        (folder / f"rank-{beat['rank']:05d}.json").write_text(json.dumps(beat))
    assert main(["status", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    behind = [line for line in out.splitlines() if line.startswith("behind:")]
    assert len(behind) == 1 and behind[0].startswith("behind: rank 1 on zt-hostb (pid 101) has been in step 5 forward")
    assert "pkill -USR2" in out


def test_status_without_heartbeats_is_one_clear_error(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "no heartbeats" in capsys.readouterr().err
    with pytest.raises(Exception, match="no heartbeats"):
        status(tmp_path)


def test_a_rank_without_any_heartbeat_is_reported_missing(tmp_path):
    from launcher.status import format_status

    beats = [_beat(0, 2, "forward", 1), _beat(2, 2, "forward", 1)]
    text = format_status(tmp_path, rank_statuses(beats, NOW))
    assert "missing: no heartbeat from rank(s) [1] (never started)" in text
