"""`zerotune prep --slurm/--srun/--step`: the job script, the srun line and the worker index, without SLURM."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from launcher.cli import build_parser
from launcher.prep_slurm import render_prep_job, srun_argv, worker_index
from launcher.slurm import SlurmError


def _args(*extra: str):
    return build_parser().parse_args(["prep", "runs/a run.yaml", "--set", "data.seq_len=512", *extra])


def test_job_script_runs_the_same_config_and_overrides_inside_the_allocation(tmp_path):
    args = _args("--slurm", "--nodes", "3", "--time", "01:30:00", "--partition", "cpu", "--cpus-per-task", "16")
    text = render_prep_job(args, tmp_path / "logs", python="/venv/bin/python")
    assert not re.search(r"@[A-Z_]+@", text)
    lines = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert not any("$" in line for line in lines)
    for expected in ("--nodes=3", "--ntasks-per-node=1", "--time=01:30:00", "--partition=cpu",
                     "--cpus-per-task=16", "--mem=0", f"--output={tmp_path}/logs/%x-%j.out"):
        assert f"#SBATCH {expected}" in lines
    command = shlex.split(text.strip().splitlines()[-1])
    assert command[0] == "exec" and command[1:5] == ["/venv/bin/python", "-m", "launcher.cli", "prep"]
    assert command[5].endswith("runs/a run.yaml") and command[6:] == ["--set", "data.seq_len=512", "--srun"]
    script = tmp_path / "prep.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_srun_line_has_one_task_per_node_and_keeps_the_other_workers_alive():
    env = {"SLURM_JOB_NUM_NODES": "4", "SLURM_CPUS_PER_TASK": "8"}
    cmd = srun_argv(_args("--srun", "--force"), env)
    assert cmd[:6] == ["srun", "--kill-on-bad-exit=0", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1",
                       "--cpus-per-task=8"]
    assert cmd[-2:] == ["--step", "units"] and "--force" not in cmd, "only the split step rebuilds"


@pytest.mark.parametrize("flags, env, expected", [
    ([], {}, (0, 1)),
    ([], {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, (3, 4)),
    (["--worker", "1", "--workers", "2"], {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, (1, 2)),
])
def test_worker_index(flags, env, expected):
    assert worker_index(_args("--step", "units", *flags), env) == expected


def test_bad_requests_are_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(SlurmError, match="0 <= worker < workers"):
        worker_index(_args("--step", "units", "--worker", "2", "--workers", "2"), {})
    with pytest.raises(SlurmError, match="HH:MM:SS"):
        render_prep_job(_args("--slurm", "--time", "an hour"), tmp_path)
    with pytest.raises(SlurmError, match="--nodes 0 must be >= 1"):
        render_prep_job(_args("--slurm", "--nodes", "0"), tmp_path)


def test_srun_outside_an_allocation_and_two_modes_at_once_are_refused(tmp_path, sample_csv, capsys, monkeypatch):
    import importlib.util
    from pathlib import Path

    from launcher.cli import main

    spec = importlib.util.spec_from_file_location("launcher_test_runs", Path(__file__).with_name("runs.py"))
    runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runs)
    run_yaml = runs.write_run_yaml(tmp_path / "run.yaml", runs.run_dict(tmp_path / "model", sample_csv,
                                                                         tmp_path / "data", tmp_path / "out"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["prep", str(run_yaml), "--srun"]) == 2
    assert "--srun runs inside a SLURM allocation" in capsys.readouterr().err
    assert main(["prep", str(run_yaml), "--srun", "--step", "units"]) == 2
    assert "use one of --slurm" in capsys.readouterr().err
    assert main(["prep", str(run_yaml), "--slurm", "--nodes", "2", "--dry-run"]) == 0
    script = tmp_path / "data.slurm" / "prep.sbatch"
    assert "#SBATCH --nodes=2" in script.read_text() and not (tmp_path / "data").exists()
