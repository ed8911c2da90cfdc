"""`zerotune prep` over a SLURM allocation: ``--slurm --nodes N`` submits a job, ``--srun`` runs every step
inside an allocation, ``--step split|units|finish`` runs one step (data_prep/distributed.py).

The units are data.num_shards hash units (one output shard each), so the output is the same however many
nodes run them; a job whose worker was killed leaves no manifest, and submitting the same prep again runs
only the unfinished units.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from launcher.slurm import REPO_ROOT, SlurmError, sbatch, slurm_present, time_to_seconds

PREP_TEMPLATE = REPO_ROOT / "slurm" / "prep.sbatch"
STEPS = ("split", "units", "finish")


def add_arguments(p) -> None:
    """The distributed options of `zerotune prep`."""
    g = p.add_argument_group("distributed prep", "data.num_shards hash units, one output shard each; the output "
                                                 "is the same for any number of nodes (docs/data.md)")
    g.add_argument("--slurm", action="store_true", help="write <data.output_dir>.slurm/prep.sbatch and submit "
                                                        "it: prep over --nodes nodes, one task per node")
    g.add_argument("--nodes", type=int, default=1, help="nodes for --slurm (default 1)")
    g.add_argument("--time", default="02:00:00", help="time limit for --slurm, HH:MM:SS or D-HH:MM:SS")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per node's task (data.num_proc auto uses them; "
                                                     "without it SLURM may bind each task to one CPU)")
    g.add_argument("--mem", default="0", help="memory per node, SLURM syntax (default 0: all of the node's)")
    g.add_argument("--dry-run", action="store_true", help="with --slurm: write the job script, do not submit")
    g.add_argument("--srun", action="store_true", help="inside an allocation: split here, run the units with one "
                                                       "srun task per node, write the manifest here")
    g.add_argument("--step", choices=STEPS, help="run one step only (units: this worker's unfinished units)")
    g.add_argument("--worker", type=int, help="--step units: this worker's index (default SLURM_PROCID or 0)")
    g.add_argument("--workers", type=int, help="--step units: number of workers (default SLURM_NTASKS or 1)")


def is_distributed(args) -> bool:
    """True when the prep command asks for the distributed layout."""
    return bool(args.slurm or args.srun or args.step)


def run(args, cfg) -> int:
    """Dispatch `zerotune prep` with --slurm, --srun or --step."""
    from data_prep import distributed

    if sum(map(bool, (args.slurm, args.srun, args.step))) > 1:
        raise SlurmError("use one of --slurm (submit a job), --srun (inside an allocation) or --step")
    model = (cfg.model.name_or_path, cfg.model.revision)
    if args.slurm:
        return submit(args, cfg)
    if args.srun:
        return run_in_allocation(args, cfg)
    if args.step == "split":
        distributed.split_step(cfg.data, model[0], model[1], args.force)
    elif args.step == "units":
        worker, workers = worker_index(args, os.environ)
        distributed.units_step(cfg.data, model[0], worker, workers, model[1])
    else:
        distributed.finish_step(cfg.data, model[0], model[1])
    return 0


def worker_index(args, env) -> tuple[int, int]:
    """(worker, workers) from --worker/--workers, else from SLURM's task variables, else (0, 1)."""
    worker = args.worker if args.worker is not None else int(env.get("SLURM_PROCID", 0))
    workers = args.workers if args.workers is not None else int(env.get("SLURM_NTASKS", 1))
    if workers < 1 or not 0 <= worker < workers:
        raise SlurmError(f"--worker {worker} of --workers {workers}: expected 0 <= worker < workers")
    return worker, workers


def prep_argv(args, step_flag: list[str], python: str = sys.executable) -> list[str]:
    """The `zerotune prep` command line that re-runs this config (same --set overrides) as ``step_flag``."""
    argv = [python, "-m", "launcher.cli", "prep", str(Path(args.config).resolve())]
    for item in args.overrides:
        argv += ["--set", item]
    return argv + (["--force"] if args.force and step_flag == ["--srun"] else []) + step_flag


def srun_argv(args, env) -> list[str]:
    """One srun task per node of the allocation, each running its share of the units."""
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    cpus = [f"--cpus-per-task={env['SLURM_CPUS_PER_TASK']}"] if env.get("SLURM_CPUS_PER_TASK") else []
    # --kill-on-bad-exit=0: a failed worker must not take the others' units down with it.
    return ["srun", "--kill-on-bad-exit=0", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", *cpus,
            *prep_argv(args, ["--step", "units"])]


def run_in_allocation(args, cfg) -> int:
    """--srun: split in this process, run the units over srun, then finish (which refuses unfinished units)."""
    from data_prep import distributed

    if not os.environ.get("SLURM_JOB_ID"):
        raise SlurmError("--srun runs inside a SLURM allocation (sbatch or salloc); from a login node use "
                         "`zerotune prep CONFIG --slurm --nodes N`")
    model, revision = cfg.model.name_or_path, cfg.model.revision
    t0 = time.monotonic()
    if distributed.split_step(cfg.data, model, revision, args.force) is None:
        return 0
    cmd = srun_argv(args, os.environ)
    print(f"zerotune prep: split step {time.monotonic() - t0:.1f} s; units over srun: {shlex.join(cmd)}", flush=True)
    t1 = time.monotonic()
    rc = subprocess.run(cmd).returncode
    print(f"zerotune prep: units step {time.monotonic() - t1:.1f} s (srun exit code {rc})", flush=True)
    t2 = time.monotonic()
    distributed.finish_step(cfg.data, model, revision)
    print(f"zerotune prep: finish step {time.monotonic() - t2:.1f} s", flush=True)
    return 0


def render_prep_job(args, log_dir: Path, python: str = sys.executable) -> str:
    """slurm/prep.sbatch with every @NAME@ filled in (#SBATCH lines get literal values only)."""
    if args.nodes < 1:
        raise SlurmError(f"--nodes {args.nodes} must be >= 1")
    time_to_seconds(args.time)  # a malformed --time fails here, not in sbatch
    extra = [f"#SBATCH --mem={args.mem}"]
    extra += [f"#SBATCH --cpus-per-task={args.cpus_per_task}"] if args.cpus_per_task else []
    extra += [f"#SBATCH --partition={args.partition}"] if args.partition else []
    extra += [f"#SBATCH --account={args.account}"] if args.account else []
    values = {"JOB_NAME": "zerotune-prep", "LOG_DIR": str(log_dir), "NODES": str(args.nodes), "TIME": args.time,
              "EXTRA_SBATCH": "\n".join(extra), "REPO_ROOT": shlex.quote(str(REPO_ROOT)),
              "PREP_COMMAND": shlex.join(prep_argv(args, ["--srun"], python))}
    return re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], PREP_TEMPLATE.read_text(encoding="utf-8"))


def submit(args, cfg) -> int:
    """--slurm: write the job script beside data.output_dir and submit it (not with --dry-run)."""
    out_dir = Path(cfg.data.output_dir).resolve()
    job_dir = out_dir.parent / f"{out_dir.name}.slurm"
    job_dir.mkdir(parents=True, exist_ok=True)
    script = job_dir / "prep.sbatch"
    script.write_text(render_prep_job(args, job_dir), encoding="utf-8")
    print(f"wrote {script} ({args.nodes} node(s), {cfg.data.num_shards} units = data.num_shards; "
          f"log in {job_dir})")
    if args.dry_run:
        return 0
    if not slurm_present():
        raise SlurmError(f"sbatch not found here: submit {script} with sbatch on the cluster's login node, or use "
                         f"--dry-run to write the script only")
    job_id = sbatch(script)
    (job_dir / "job_id").write_text(job_id + "\n", encoding="utf-8")
    print(f"submitted job {job_id}; the prepared data appears in {out_dir} once every unit is finished "
          f"(submit again to finish a job that failed: finished units are kept)")
    return 0
