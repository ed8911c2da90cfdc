"""data.num_proc: auto resolved from the affinity and cgroup quota, the processes each map stage uses, and
one tokenizer thread per process while prep runs."""

from __future__ import annotations

import os

import pytest

from data_prep import procs
from data_prep.procs import (MAX_AUTO_PROCS, TOKENIZERS_PARALLELISM, cgroup_cpu_quota, describe,
                             one_tokenizer_thread, resolve_num_proc, stage_procs, usable_cpus)

V2_ROOT_ONLY = "0::/\n"


def _cgroup(root, folder: str, files: dict[str, str]):
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return root


def test_affinity_alone_when_no_cgroup_sets_a_quota(tmp_path):
    assert usable_cpus({0, 3, 5}, tmp_path / "none", V2_ROOT_ONLY)[0] == 3
    assert usable_cpus({7}, tmp_path / "none", "") == (1, "1 usable CPU")
    root = _cgroup(tmp_path, "", {"cpu.max": "max 100000\n"})
    assert usable_cpus(range(8), root, V2_ROOT_ONLY) == (8, "8 usable CPUs")


def test_cgroup_v2_quota_rounds_up_and_limits_the_affinity(tmp_path):
    root = _cgroup(tmp_path, "", {"cpu.max": "150000 100000\n"})
    assert cgroup_cpu_quota(root, V2_ROOT_ONLY) == 2
    cpus, why = usable_cpus(range(8), root, V2_ROOT_ONLY)
    assert cpus == 2 and "quota of 2" in why and "8" in why
    assert usable_cpus({0}, root, V2_ROOT_ONLY)[0] == 1, "a quota above the affinity does not raise it"


def test_cgroup_v2_quota_of_an_ancestor_of_the_process_cgroup(tmp_path):
    _cgroup(tmp_path, "job", {"cpu.max": "400000 100000"})
    _cgroup(tmp_path, "job/step", {"cpu.max": "max 100000"})
    assert cgroup_cpu_quota(tmp_path, "0::/job/step\n") == 4
    _cgroup(tmp_path, "job/step", {"cpu.max": "800000 100000"})
    assert cgroup_cpu_quota(tmp_path, "0::/job/step\n") == 4, "the tightest quota wins, wherever it is"
    _cgroup(tmp_path, "job/step", {"cpu.max": "50000 100000"})
    assert cgroup_cpu_quota(tmp_path, "0::/job/step\n") == 1, "at least one CPU"


def test_cgroup_v1_quota_and_minus_one_for_none(tmp_path):
    v1 = "4:memory:/x\n1:cpu,cpuacct:/\n"
    root = _cgroup(tmp_path, "cpu,cpuacct", {"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_quota(root, v1) is None
    _cgroup(tmp_path, "cpu,cpuacct", {"cpu.cfs_quota_us": "300000\n"})
    assert cgroup_cpu_quota(root, v1) == 3
    assert usable_cpus(range(16), root, v1)[0] == 3


def test_unreadable_quota_files_mean_no_quota(tmp_path):
    root = _cgroup(tmp_path, "", {"cpu.max": "garbage"})
    assert cgroup_cpu_quota(root, V2_ROOT_ONLY) is None


def test_auto_is_capped_and_an_explicit_count_passes_through(monkeypatch):
    monkeypatch.setattr(procs, "usable_cpus", lambda: (64, "64 usable CPUs"))
    capped = resolve_num_proc("auto")
    assert capped == (MAX_AUTO_PROCS, f"data.num_proc auto: 64 usable CPUs, capped at {MAX_AUTO_PROCS}")
    assert resolve_num_proc(32).count == 32, "an explicit count goes past the cap"
    monkeypatch.setattr(procs, "usable_cpus", lambda: (2, "2 usable CPUs"))
    assert resolve_num_proc("auto") == (2, "data.num_proc auto: 2 usable CPUs")
    assert resolve_num_proc(1) == (1, "data.num_proc 1")


def test_a_stage_uses_no_more_processes_than_batches_and_no_pool_for_one():
    assert stage_procs(8, rows=200, batch_rows=1000) is None, "one batch: no pool"
    assert stage_procs(8, rows=1000, batch_rows=1000) is None
    assert stage_procs(8, rows=1001, batch_rows=1000) == 2
    assert stage_procs(2, rows=10_000, batch_rows=1000) == 2
    assert stage_procs(1, rows=10_000, batch_rows=1000) is None
    auto2 = procs.Procs(2, "data.num_proc auto: 2 usable CPUs")
    assert describe(auto2, 5000, 1000) == "2 processes (data.num_proc auto: 2 usable CPUs)"
    assert describe(auto2, 200, 1000) == ("1 process (data.num_proc auto: 2 usable CPUs; 200 rows are 1 batch of "
                                          "data.map_batch_size 1000)")


def test_tokenizer_threads_off_within_and_the_environment_restored(monkeypatch):
    monkeypatch.delenv(TOKENIZERS_PARALLELISM, raising=False)
    with one_tokenizer_thread():
        assert os.environ[TOKENIZERS_PARALLELISM] == "false"
    assert TOKENIZERS_PARALLELISM not in os.environ
    with pytest.raises(RuntimeError), one_tokenizer_thread():
        raise RuntimeError("a stage failed")
    assert TOKENIZERS_PARALLELISM not in os.environ, "restored on error too"


def test_a_user_setting_of_tokenizers_parallelism_is_left_alone(monkeypatch):
    monkeypatch.setenv(TOKENIZERS_PARALLELISM, "true")
    with one_tokenizer_thread():
        assert os.environ[TOKENIZERS_PARALLELISM] == "true"
    assert os.environ[TOKENIZERS_PARALLELISM] == "true"


def test_num_proc_accepts_auto_and_positive_ints_and_names_the_key_otherwise():
    from training.config import ConfigError, config_from_dict

    def load(num_proc):
        raw = {"model": {"name_or_path": "m"}, "output_dir": "out", "data": {"sources": ["a.csv"]}}
        if num_proc is not None:
            raw["data"]["num_proc"] = num_proc
        return config_from_dict(raw)

    assert load(None).data.num_proc == "auto", "auto is the default"
    assert load("auto").data.num_proc == "auto" and load(3).data.num_proc == 3
    with pytest.raises(ConfigError, match=r"data\.num_proc: must be >= 1 or auto \(the usable CPUs\), got 0"):
        load(0)
    with pytest.raises(ConfigError, match=r"data\.num_proc: expected int \| 'auto', got str 'fast'"):
        load("fast")


def test_map_stages_fork_only_past_one_batch(tmp_path):
    from data_prep.config import DataConfig
    from data_prep.pipeline import _map_kwargs

    cfg = DataConfig(map_batch_size=1000)
    assert _map_kwargs(cfg, tmp_path, "tokenize", "f", procs=2, rows=349)["num_proc"] is None
    assert _map_kwargs(cfg, tmp_path, "tokenize", "f", procs=2, rows=349_000)["num_proc"] == 2
