"""Run the training driver as one SLURM task: map SLURM's task variables to torch.distributed's, then exec.

Used by srun (one task per GPU): ``srun python -m launcher.slurm_exec training/train.py --config RUN``.
The process is replaced by the driver (exec), so srun's signals reach the driver itself.
"""

from __future__ import annotations

import os
import sys

from launcher.cluster import slurm_rank_env


def task_argv(argv: list[str], env: dict[str, str], python: str = sys.executable) -> list[str]:
    """The driver's argv; ``--local_rank`` is appended as the deepspeed launcher does."""
    if not argv:
        raise SystemExit("usage: python -m launcher.slurm_exec SCRIPT [ARGS...]")
    return [python, *argv, f"--local_rank={env['LOCAL_RANK']}"]


def main(argv: list[str] | None = None) -> None:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM and exec the driver."""
    argv = sys.argv[1:] if argv is None else argv
    env = slurm_rank_env(os.environ)
    os.environ.update(env)
    cmd = task_argv(argv, env)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
