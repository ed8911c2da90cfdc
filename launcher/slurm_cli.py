"""`zerotune slurm CONFIG`: write the resolved run dir and a job script, check it, optionally submit it."""

from __future__ import annotations

from pathlib import Path

from launcher.slurm import JobSpec, render, sbatch, slurm_present


def cmd_slurm(args) -> int:
    """Validate config and data, render <output_dir>/job.sbatch, check it with sbatch --test-only, submit."""
    from launcher.cluster import Cluster, Host
    from launcher.launch import check_data, resolve_auto_stage
    from launcher.launch_cli import steps_line
    from training.config import load_config, save_config

    cfg = load_config(args.config, args.overrides)
    world_size = args.nodes * args.gpus_per_node
    cfg.validate(world_size)
    manifest = check_data(cfg.data.output_dir)
    nodes = Cluster([Host(f"node{i}", args.gpus_per_node) for i in range(args.nodes)], "slurm")
    stage_reason = resolve_auto_stage(cfg, nodes, args.gpu_memory_gb, args.cpu_memory_gb)
    if stage_reason:
        print(stage_reason)
    run_dir = Path(cfg.output_dir).resolve()
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    save_config(cfg, config_path)
    warn_seconds = check_warn_seconds(cfg, args.warn_seconds, args.nodes)
    spec = JobSpec(nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time, partition=args.partition,
                   account=args.account, job_name=args.job_name, warn_seconds=warn_seconds,
                   cpu_only=args.cpu_only, cpus_per_task=args.cpus_per_task or (1 if args.cpu_only else 8),
                   mem=args.mem, exclusive=args.exclusive)
    script = run_dir / "job.sbatch"
    script.write_text(render(spec, config_path, log_dir), encoding="utf-8")
    print(f"wrote {script} ({args.nodes} node(s) x {args.gpus_per_node} rank(s), {world_size} ranks; "
          f"logs in {log_dir})")
    print(steps_line(cfg, manifest, world_size))
    if not slurm_present():
        print("sbatch not found here: not checked; submit it with `sbatch` on the cluster")
        return 0
    print(sbatch(script, test_only=True))
    if args.submit:
        job_id = sbatch(script)
        (run_dir / "job_id").write_text(job_id + "\n", encoding="utf-8")
        print(f"submitted job {job_id}")
    return 0


def check_warn_seconds(cfg, warn_seconds: int | None, nodes: int) -> int:
    """--warn-seconds as given, or from the plan's checkpoint save estimate; prints a warning when it is
    shorter than the run's last measured save (plus margin), which a preempted job may not finish."""
    from launcher.plan import checkpoint_estimate, model_shape
    from launcher.slurm import warn_seconds_for
    from training.checkpoint import checkpoint_root, last_save_time

    if warn_seconds is None:
        shape = model_shape(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.revision)
        estimate = checkpoint_estimate(shape.params, cfg.train.precision, nodes)
        warn_seconds = max(300, warn_seconds_for(estimate["estimated_save_seconds"]))
        print(f"--warn-seconds {warn_seconds}: from the plan's checkpoint estimate ({estimate['gb']} GB, "
              f"~{estimate['estimated_save_seconds']} s to save)")
    last = last_save_time(checkpoint_root(cfg.output_dir))
    if last is not None and warn_seconds < warn_seconds_for(last[1]):
        print(f"warning: --warn-seconds {warn_seconds} is shorter than the last measured checkpoint save "
              f"({last[1]:.1f} s for {last[0]}) plus margin; a preempted job may be killed mid-save and lose "
              f"the work since the previous checkpoint: use --warn-seconds {warn_seconds_for(last[1])} or more")
    return warn_seconds


def register(subparsers, add_config_args) -> None:
    """Add the `slurm` subcommand."""
    p = subparsers.add_parser("slurm", help="render (and submit) a multi-node SLURM job for a run",
                              description="Write <output_dir>/job.sbatch from slurm/train.sbatch: one srun task "
                                          "per GPU, a USR1 warning before the time limit, checkpoint and "
                                          "requeue. Checked with `sbatch --test-only` where SLURM is present.")
    add_config_args(p)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="ranks (GPUs) per node")
    p.add_argument("--time", required=True, help="time limit, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name", default="zerotune")
    p.add_argument("--warn-seconds", type=int,
                   help="SIGUSR1 this many seconds before the limit: checkpoint, exit, requeue (default: from "
                        "the plan's checkpoint size estimate, at least 300)")
    p.add_argument("--cpus-per-task", type=int,
                   help="CPUs per rank (default 8; 1 with --cpu-only): CPU Adam and model loading need several")
    p.add_argument("--mem", default="0", help="memory per node, SLURM syntax (default 0: all of the node's)")
    p.add_argument("--exclusive", action="store_true", help="ask for whole nodes")
    p.add_argument("--cpu-only", action="store_true",
                   help="ranks are CPU processes: request no GPUs (CPU test clusters)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0,
                   help="memory per GPU on the compute nodes, for deepspeed.zero_stage: auto (default 80)")
    p.add_argument("--cpu-memory-gb", type=float, default=1024.0,
                   help="RAM per compute node, for auto's offload check (default 1024)")
    p.add_argument("--submit", action="store_true", help="submit the job after the check")
    p.set_defaults(func=cmd_slurm)
