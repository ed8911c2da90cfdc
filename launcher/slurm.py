"""Render slurm/train.sbatch for one run, check it with `sbatch --test-only`, submit it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_ROOT / "slurm" / "train.sbatch"
TRAIN_SCRIPT = REPO_ROOT / "training" / "train.py"
# After the first rank ends, how long srun lets the others end by themselves before killing them.
RANK_EXIT_GRACE_S = 60


class SlurmError(RuntimeError):
    """A job request SLURM refuses, or an invalid --time / --nodes."""

    user_error = True


@dataclass
class JobSpec:
    """What the job asks SLURM for."""

    nodes: int
    gpus_per_node: int
    time: str
    partition: str | None = None
    account: str | None = None
    job_name: str = "zerotune"
    warn_seconds: int = 300
    # On CPU-only clusters (tests) ranks are processes and no GPUs are requested.
    cpu_only: bool = False
    # Asked for explicitly: many clusters give one CPU per task by default, which starves CPU Adam, data
    # loading and model loading. mem "0" is SLURM's "all of each node's memory".
    cpus_per_task: int = 8
    mem: str = "0"
    exclusive: bool = False


def time_to_seconds(text: str) -> int:
    """SLURM's ``[D-]HH:MM:SS`` (or MM:SS) as seconds; errors say the expected format."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not m:
        raise SlurmError(f"--time {text!r}: expected HH:MM:SS or D-HH:MM:SS")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def render(spec: JobSpec, run_config: str | Path, log_dir: str | Path, python: str = sys.executable,
           template: str | None = None) -> str:
    """The job script with every @NAME@ placeholder filled in; #SBATCH lines get literal values only."""
    if spec.nodes < 1 or spec.gpus_per_node < 1:
        raise SlurmError(f"--nodes {spec.nodes} and --gpus-per-node {spec.gpus_per_node} must be >= 1")
    limit_s = time_to_seconds(spec.time)
    if spec.warn_seconds >= limit_s:
        raise SlurmError(f"the warning {spec.warn_seconds}s before the limit must be shorter than --time "
                         f"{spec.time} ({limit_s}s)")
    if spec.cpus_per_task < 1:
        raise SlurmError(f"--cpus-per-task {spec.cpus_per_task} must be >= 1")
    extra = [f"#SBATCH --cpus-per-task={spec.cpus_per_task}", f"#SBATCH --mem={spec.mem}"]
    if spec.exclusive:
        extra.append("#SBATCH --exclusive")
    if not spec.cpu_only:
        extra.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    if spec.partition:
        extra.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        extra.append(f"#SBATCH --account={spec.account}")
    values = {"JOB_NAME": spec.job_name, "LOG_DIR": str(log_dir), "WARN_SECONDS": str(spec.warn_seconds),
              "NODES": str(spec.nodes), "RANKS_PER_NODE": str(spec.gpus_per_node), "TIME": spec.time,
              "EXTRA_SBATCH": "\n".join(extra), "REPO_ROOT": shlex.quote(str(REPO_ROOT)),
              "PYTHON": shlex.quote(python), "TRAIN_SCRIPT": shlex.quote(str(TRAIN_SCRIPT)),
              "RUN_CONFIG": shlex.quote(str(run_config)), "RANK_EXIT_GRACE_S": str(RANK_EXIT_GRACE_S),
              "CPUS_PER_TASK": str(spec.cpus_per_task)}
    text = TEMPLATE.read_text(encoding="utf-8") if template is None else template
    out = re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), text)
    left = re.findall(r"@[A-Z_]+@", out)
    if left:
        raise SlurmError(f"template {TEMPLATE} has unknown placeholders {left}")
    return out


def warn_seconds_for(save_seconds: float) -> int:
    """A --warn-seconds that leaves room for a save of ``save_seconds``: the save plus half again plus a
    minute (the step or evaluation batch in flight, the exit, slower storage on a busy day)."""
    return int(save_seconds * 1.5 + 60 + 0.999)


def sbatch(script: Path, test_only: bool = False) -> str:
    """Run sbatch (``--test-only`` just asks the controller); returns its output, raises SlurmError."""
    cmd = ["sbatch", *(["--test-only"] if test_only else ["--parsable"]), str(script)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} refused the job: {(res.stderr or res.stdout).strip()}")
    return (res.stdout + res.stderr).strip()


def slurm_present() -> bool:
    """True where sbatch is installed."""
    return shutil.which("sbatch") is not None
