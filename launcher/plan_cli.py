"""`zerotune plan CONFIG`: memory per ZeRO stage, the stage to use, batch arithmetic and time."""

from __future__ import annotations

from launcher.plan import DEFAULT_MFU, DEFAULT_PEAK_TFLOPS, format_plan, make_plan


def cmd_plan(args) -> int:
    """Print the plan as a table, or as one JSON object with --json."""
    from training.config import load_config

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, num_nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                     gpu_memory_gb=args.gpu_memory_gb, cpu_memory_gb=args.cpu_memory_gb,
                     peak_tflops=args.peak_tflops, mfu=args.mfu)
    print(plan.to_json() if args.json else format_plan(plan))
    return 0


def register(subparsers, add_config_args) -> None:
    """Add the `plan` subcommand."""
    p = subparsers.add_parser("plan", help="estimate memory per ZeRO stage, pick a stage, count steps and time",
                              description="Count the model's parameters from its config (no weights are "
                                          "loaded), estimate per-GPU memory for ZeRO stages 0-3 and CPU "
                                          "offload, pick the fastest that fits, and do the batch arithmetic.")
    add_config_args(p)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="usable memory per GPU (default 80)")
    p.add_argument("--cpu-memory-gb", type=float, default=1024.0, help="RAM per node for offload (default 1024)")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help="peak TFLOP/s per GPU (default 989, dense bf16 H100 SXM)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)
