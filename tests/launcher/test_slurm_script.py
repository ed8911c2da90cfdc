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


def test_cpus_and_memory_are_requested_explicitly(tmp_path):
    text = render(JobSpec(nodes=2, gpus_per_node=4, time="01:00:00", cpus_per_task=12, mem="500G", exclusive=True),
                  "c.yaml", tmp_path)
    lines = _sbatch_lines(text)
    assert "#SBATCH --cpus-per-task=12" in lines and "#SBATCH --mem=500G" in lines and "#SBATCH --exclusive" in lines
    assert "--cpus-per-task=12" in text.split("\nsrun ", 1)[1].split("&\n", 1)[0]  # srun does not inherit it
    default = _sbatch_lines(render(JobSpec(nodes=1, gpus_per_node=1, time="01:00:00"), "c.yaml", tmp_path))
    assert "#SBATCH --cpus-per-task=8" in default and "#SBATCH --mem=0" in default
    assert "#SBATCH --exclusive" not in default
    with pytest.raises(SlurmError, match="--cpus-per-task 0"):
        render(JobSpec(nodes=1, gpus_per_node=1, time="01:00:00", cpus_per_task=0), "c.yaml", tmp_path)


def test_warn_seconds_default_comes_from_the_checkpoint_estimate_and_a_short_one_is_flagged(tmp_path, capsys,
                                                                                          tiny_model_dir):
    from launcher.plan import checkpoint_estimate
    from launcher.slurm import warn_seconds_for
    from launcher.slurm_cli import check_warn_seconds
    from training.checkpoint import checkpoint_root, record_save_time
    from training.config import config_from_dict

    assert checkpoint_estimate(70_000_000_000, "bf16", 8)["estimated_save_seconds"] == \
        pytest.approx(14 * 70e9 / 1024**3 / 8, abs=0.1)
    cfg = config_from_dict({"output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(tiny_model_dir)},
                            "data": {"sources": ["x.csv"]}})
    assert check_warn_seconds(cfg, None, nodes=1) == 300  # a tiny model saves in well under 300 s
    assert "from the plan's checkpoint estimate" in capsys.readouterr().out
    root = checkpoint_root(cfg.output_dir)
    root.mkdir(parents=True)
    record_save_time(root, "step-00000010", 400.0)
    assert check_warn_seconds(cfg, 300, nodes=1) == 300
    out = capsys.readouterr().out
    assert "shorter than the last measured checkpoint save (400.0 s for step-00000010)" in out
    assert f"use --warn-seconds {warn_seconds_for(400.0)} or more" in out and warn_seconds_for(400.0) == 660
    check_warn_seconds(cfg, 700, nodes=1)
    assert "warning" not in capsys.readouterr().out
