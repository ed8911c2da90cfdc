"""`zerotune launch CONFIG`: validate config, data and cluster, write the run dir, start the ranks."""

from __future__ import annotations

import shlex
import sys

from launcher.cluster import check_hosts, discover
from launcher.launch import (check_data, check_launcher_tools, resolve_auto_stage, run_ranks, stage_data,
                             write_run_dir)


def cmd_launch(args) -> int:
    """Check everything, write the run dir, then run (or, with --dry-run, print) the command."""
    from training.config import load_config
    from training.steps import resolved_train

    cfg = load_config(args.config, args.overrides)
    cluster = discover(hostfile=args.hostfile, num_gpus=args.num_gpus, master_port=args.master_port,
                       master_addr=args.master_addr)
    cfg.validate(cluster.world_size)
    cfg.train = resolved_train(cfg.train, cluster.world_size)  # micro and accumulation for these ranks
    if cluster.source != "slurm":
        check_hosts(cluster, ssh_timeout_s=args.ssh_timeout)
    check_launcher_tools(cluster)
    manifest = check_data(cfg.data.output_dir)
    stage_reason = resolve_auto_stage(cfg, cluster, args.gpu_memory_gb, args.cpu_memory_gb)
    if stage_reason:
        print(stage_reason)
    stage_dir = None
    if args.stage_data and not args.dry_run:
        stage_dir = stage_data(cfg.data.output_dir, args.stage_data, cluster, manifest)
    files = write_run_dir(cfg, cluster, manifest, stage_dir=stage_dir,
                          train_args=["--no-preflight"] if args.no_preflight else [])
    argv = files.argv
    print(_summary(cfg, cluster, files, args.stage_data))
    print(steps_line(cfg, manifest, cluster.world_size))
    print(f"command: {shlex.join(argv)}")
    if args.dry_run:
        print("dry run: nothing started")
        return 0
    sys.stdout.flush()
    return run_ranks(argv, cluster=cluster, files=files)


def _summary(cfg, cluster, files, stage_dir) -> str:
    from training.steps import data_parallel_size

    hosts = ", ".join(f"{h.name} x{h.slots}" for h in cluster.hosts)
    sp = cfg.train.sequence_parallel_size
    data_parallel = data_parallel_size(cluster.world_size, sp)
    ranks = f"{data_parallel} ranks" if sp == 1 else \
        f"{data_parallel} data-parallel groups of {sp} sequence-parallel ranks"
    lines = [f"cluster ({cluster.source}): {hosts}; {cluster.world_size} ranks, rendezvous "
             f"{cluster.master_addr}:{cluster.master_port}",
             f"run dir: {files.run_dir} (config.yaml, command.txt, launch.sh"
             f"{', assignment.json' if files.assignment else ''}{', hostfile' if files.hostfile else ''}"
             f"{', ds_config.json' if files.ds_config else ''}"
             f"{', .deepspeed_env (' + str(len(files.env_file.read_text().splitlines())) + ' variables)' if files.env_file else ''})",
             f"batch: micro {cfg.train.micro_batch_size} x accumulation {cfg.train.gradient_accumulation_steps}"
             f" x {ranks}"]
    if stage_dir:
        lines.append(f"data staged to {stage_dir} and verified against the manifest")
    return "\n".join(lines)


def steps_line(cfg, manifest: dict, world_size: int) -> str:
    """Steps per epoch and in total, from training.steps.plan_steps (what the run takes)."""
    from training.steps import plan_steps, train_sequences

    plan = plan_steps(cfg.train, train_sequences(manifest), world_size)
    return (f"steps: {plan.train_sequences} training sequences / {plan.global_batch_size} per optimizer step = "
            f"{plan.steps_per_epoch} steps per epoch; {plan.total_steps} steps in total")


def register(subparsers, add_config_args) -> None:
    """Add the `launch` subcommand."""
    p = subparsers.add_parser("launch", help="check config, data and cluster, then start training",
                              description="Validate the config, the prepared data (checksums) and the cluster, "
                                          "write the run dir (config.yaml, assignment.json, command), and "
                                          "start the ranks with the deepspeed launcher (srun under SLURM). "
                                          "The exit code is the training job's.")
    add_config_args(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hostfile", help="DeepSpeed hostfile: one 'HOST slots=N' line per machine")
    where.add_argument("--num-gpus", type=int, help="ranks on this machine (on CPU: N gloo processes)")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--master-addr", help="rendezvous address of a --hostfile launch (default: the first host's "
                                         "name as written in the hostfile; it must be one every host reaches)")
    p.add_argument("--ssh-timeout", type=int, default=5, help="seconds to wait for each remote host's ssh")
    p.add_argument("--stage-data", metavar="DIR",
                   help="copy shards to node-local DIR first (sbcast under SLURM) and verify checksums")
    p.add_argument("--gpu-memory-gb", type=float,
                   help="memory per rank for deepspeed.zero_stage: auto (default: detected; on CPU, RAM / ranks)")
    p.add_argument("--cpu-memory-gb", type=float, help="RAM per node for auto's offload check (default: detected)")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip the ranks' start-up check (join with a short timeout, one all-reduce, report)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the command; start nothing")
    p.set_defaults(func=cmd_launch)
