"""Heartbeat files, stack dumps (SIGUSR2 and a stalled phase) and the NCCL flight recorder's variables."""

from __future__ import annotations

import os
import signal
import socket
import time

from training.heartbeat import (FAULT_SLEEP_ENV, Heartbeat, enable_flight_recorder, heartbeat_path,
                                read_heartbeats, stacks_path)


def test_beat_records_host_pid_step_phase_and_exit(tmp_path):
    hb = Heartbeat(tmp_path, rank=3, world_size=4, stall_dump_s=None)
    before = time.time()
    hb.beat(7, "backward", micro=1)
    beat = read_heartbeats(tmp_path)[0]
    assert heartbeat_path(tmp_path, 3).name == "rank-00003.json"
    assert {k: beat[k] for k in ("rank", "world_size", "host", "pid", "step", "phase", "micro")} == \
        {"rank": 3, "world_size": 4, "host": socket.gethostname(), "pid": os.getpid(), "step": 7,
         "phase": "backward", "micro": 1}
    assert before <= beat["time"] <= time.time()
    hb.close()
    assert read_heartbeats(tmp_path)[0]["phase"] == "exit" and read_heartbeats(tmp_path)[0]["step"] == 7


def _in_this_test_file(text: str) -> bool:
    return os.path.basename(__file__) in text


def test_sigusr2_dumps_every_threads_stack_to_the_ranks_file(tmp_path):
    hb = Heartbeat(tmp_path, rank=0, world_size=1, stall_dump_s=None)
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.2)
    finally:
        hb.close()
    text = stacks_path(tmp_path, 0).read_text()
    assert "Current thread" in text or "Thread 0x" in text
    assert _in_this_test_file(text)


def test_a_step_as_long_as_the_stall_limit_dumps_stacks(tmp_path):
    hb = Heartbeat(tmp_path, rank=1, world_size=2, stall_dump_s=0.3)
    try:
        hb.beat(1, "data")
        time.sleep(0.1)
        hb.beat(2, "data")  # a new step re-arms: no dump yet
        hb.beat(2, "forward")
        assert stacks_path(tmp_path, 1).read_text() == ""
        time.sleep(1.0)  # now stuck in step 2 past the limit
    finally:
        hb.close()
    text = stacks_path(tmp_path, 1).read_text()
    assert "Timeout" in text and _in_this_test_file(text)


def test_a_shorter_record_overwrites_a_longer_one_cleanly(tmp_path):
    hb = Heartbeat(tmp_path, rank=0, world_size=1, stall_dump_s=None)
    hb.beat(123456, "backward", micro=17)
    hb.beat(1, "data")
    hb.close()
    beat = read_heartbeats(tmp_path)[0]
    assert (beat["step"], beat["phase"], beat["micro"]) == (1, "exit", 0)


def test_fault_hook_sleeps_only_the_named_rank_at_the_named_step(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_SLEEP_ENV, "1:2:0.5")
    other, sleeper = (Heartbeat(tmp_path, rank=r, world_size=2, stall_dump_s=None) for r in (0, 1))
    try:
        t0 = time.monotonic()
        other.beat(2, "forward")
        sleeper.beat(1, "forward")
        sleeper.beat(2, "backward")
        assert time.monotonic() - t0 < 0.4
        sleeper.beat(2, "forward")
        assert time.monotonic() - t0 >= 0.5
    finally:
        other.close()
        sleeper.close()


def test_flight_recorder_only_on_cuda_and_never_over_the_users_values(tmp_path, monkeypatch):
    for key in ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):
        monkeypatch.delenv(key, raising=False)
    assert enable_flight_recorder(tmp_path, cuda=False) == {}
    assert "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "50")
    set_now = enable_flight_recorder(tmp_path, cuda=True)
    assert os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "50" and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in set_now
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(tmp_path.resolve() / "heartbeats" / "nccl_trace_rank_")
