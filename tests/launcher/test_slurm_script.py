"""The job script renderer and the per-task environment, without SLURM."""

from __future__ import annotations

import re

import pytest

from launcher.slurm import TEMPLATE, JobSpec, SlurmError, render, time_to_seconds
from launcher.slurm_exec import task_argv


def _sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def test_render_fills_every_placeholder_and_sbatch_lines_are_literal(tmp_path):
    spec = JobSpec(nodes=4, gpus_per_node=8, time="1-02:00:00", partition="gpu", account="proj",
                   warn_seconds=600)
    text = render(spec, tmp_path / "run" / "config.yaml", tmp_path / "run" / "logs", python="/venv/bin/python")
    assert "@" not in re.sub(r"USR1@\d+", "", "\n".join(_sbatch_lines(text)))
    assert not re.search(r"@[A-Z_]+@", text)
    lines = _sbatch_lines(text)
    assert not any("$" in line for line in lines)  # sbatch does not expand variables there
    for expected in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=1-02:00:00",
                     "--partition=gpu", "--account=proj", "--requeue", "--open-mode=append",
                     "--signal=B:USR1@600", f"--output={tmp_path}/run/logs/%x-%j.out"):
        assert f"#SBATCH {expected}" in lines
    assert f"--config {tmp_path}/run/config.yaml" in text
    assert "scontrol requeue" in text and "PREEMPTED_EXIT_CODE=85" in text
    assert "--wait=60" in text and "--kill-on-bad-exit=0" in text


def test_render_cpu_only_requests_no_gpus(tmp_path):
    text = render(JobSpec(nodes=2, gpus_per_node=1, time="00:10:00", cpu_only=True), "c.yaml", tmp_path)
    assert not any("gpus" in line for line in _sbatch_lines(text))
    assert "#SBATCH --partition" not in text


@pytest.mark.parametrize("text, seconds", [("00:10:00", 600), ("2:03:04", 7384), ("1-00:00:00", 86400),
                                           ("05:00", 300)])
def test_time_to_seconds(text, seconds):
    assert time_to_seconds(text) == seconds


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(SlurmError, match="HH:MM:SS"):
        render(JobSpec(nodes=1, gpus_per_node=1, time="ten minutes"), "c.yaml", tmp_path)
    with pytest.raises(SlurmError, match="shorter than --time"):
        render(JobSpec(nodes=1, gpus_per_node=1, time="00:04:00", warn_seconds=300), "c.yaml", tmp_path)
    with pytest.raises(SlurmError, match="must be >= 1"):
        render(JobSpec(nodes=0, gpus_per_node=1, time="00:10:00"), "c.yaml", tmp_path)


def test_template_is_valid_bash(tmp_path):
    import subprocess

    text = render(JobSpec(nodes=2, gpus_per_node=2, time="00:10:00"), "c.yaml", tmp_path)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert TEMPLATE.read_text().startswith("#!/bin/bash")


def test_task_argv_appends_local_rank():
    assert task_argv(["t.py", "--config", "c.yaml"], {"LOCAL_RANK": "3"}, python="py") == [
        "py", "t.py", "--config", "c.yaml", "--local_rank=3"]
