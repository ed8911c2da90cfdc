"""`zerotune prep --slurm --nodes 2` on the real two-node cluster: byte for byte the one-process prep of the same
layout, and a worker killed mid-unit leaves no manifest until the resubmitted job has run the missing units."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.distributed import prepare_distributed, work_root
from slurm_cluster import slurm_cluster  # noqa: F401 - session fixture
from training.config import config_from_dict

_spec = importlib.util.spec_from_file_location("launcher_test_runs",
                                               Path(__file__).parent.parent / "launcher" / "runs.py")
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)

pytestmark = pytest.mark.slurm

END_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def _bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and (p.suffix == ".npy" or p.name == "report.json")}


def _comparable(manifest: dict) -> dict:
    out = {k: v for k, v in manifest.items() if k != "created_at"}
    out["settings"] = {k: v for k, v in manifest["settings"].items() if k != "output_dir"}
    return out


def _submit(cluster, run_yaml: Path) -> str:
    cmd = [sys.executable, "-m", "launcher.cli", "prep", str(run_yaml), "--slurm", "--nodes", "2", "--time", "00:10:00"]
    res = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.split("submitted job ")[1].split(";")[0].strip()


def _worker_pid(job: str, procid: str) -> int | None:
    """The python process of one srun task of ``job`` running `prep --step units`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = dict(item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if b"units" in cmd and env.get(b"SLURM_JOB_ID") == job.encode() and env.get(b"SLURM_PROCID") == procid.encode():
            return int(entry.name)
    return None


def _kill_worker_mid_unit(units_root: Path, job: str, unit: int, procid: str) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        pid = _worker_pid(job, procid) if list(units_root.glob(f".unit-{unit:05d}.tmp-*")) else None
        if pid:
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.01)
    raise AssertionError(f"worker {procid} of job {job} never started unit {unit}")


def test_two_node_prep_is_the_one_process_prep_even_after_a_killed_worker(slurm_cluster, tiny_model_dir, sample_csv,
                                                                          tmp_path):  # noqa: F811
    raw = runs.run_dict(tiny_model_dir, sample_csv, tmp_path / "one-process", tmp_path / "run",
                        data={"num_shards": 4})
    reference_cfg = config_from_dict(raw).data
    reference = prepare_distributed(reference_cfg, str(tiny_model_dir))
    raw["data"]["output_dir"] = str(tmp_path / "prepared")
    run_yaml = runs.write_run_yaml(tmp_path / "run.yaml", raw)

    out = tmp_path / "prepared"
    job = _submit(slurm_cluster, run_yaml)
    _kill_worker_mid_unit(work_root(out) / "units", job, unit=1, procid="1")
    info = slurm_cluster.wait_for(job, END_STATES, 300)
    log = (tmp_path / "prepared.slurm" / f"zerotune-prep-{job}.out").read_text(errors="replace")
    assert info["JobState"] == "FAILED", log[-3000:]
    assert "prep units are not finished (unit 1" in log and not (out / "manifest.json").exists()
    assert not out.exists(), "nothing looks complete before every unit is"

    job = _submit(slurm_cluster, run_yaml)
    info = slurm_cluster.wait_for(job, END_STATES, 300)
    log = (tmp_path / "prepared.slurm" / f"zerotune-prep-{job}.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "reusing the split" in log and "unit 0 of 4 done" not in log, "finished units are not run again"
    manifest = json.loads((out / "manifest.json").read_text())
    assert _comparable(manifest) == _comparable(reference)
    assert _bytes(out) == _bytes(Path(reference_cfg.output_dir))
