"""`zerotune export RUN_DIR --out DIR`: a checkpoint of any ZeRO stage as a Hugging Face model folder."""

from __future__ import annotations

from training.shard_writer import DEFAULT_MAX_SHARD_SIZE


def cmd_export(args) -> int:
    """Export, verify, and print where the folder is and how it checked out."""
    from training.export import export_checkpoint

    result = export_checkpoint(args.run_dir, args.out, tag=args.tag, dtype=args.dtype,
                               max_shard_size=args.max_shard_size)
    for note in result.notes:
        print(f"note: {note}")
    source = "best weights" if result.zero_stage is None else f"ZeRO stage {result.zero_stage}"
    print(f"exported checkpoint {result.tag} ({source}) to {result.out_dir}: "
          f"{result.num_params:,} parameters in {result.dtype}, probe logits within "
          f"{result.probe_relative_error:.2g} of the trained model's")
    return 0


def register(subparsers, add_config_args) -> None:  # noqa: ARG001 - export reads the run dir, not a config
    """Add the `export` subcommand."""
    p = subparsers.add_parser(
        "export", help="consolidate a checkpoint (any ZeRO stage) into a Hugging Face model folder",
        description="Stream the checkpoint's weights from its ZeRO partitions, one tensor at a time, into "
                    "safetensors shards, add the run's tokenizer and generation config, and verify the folder "
                    "(every tensor reads back equal to its source, names and parameter count match the "
                    "config, the probe batch's logits match the trained model's) before renaming it into "
                    "place. An incomplete checkpoint (no COMPLETE marker) is refused.")
    p.add_argument("run_dir", help="the run's output_dir (holds config.yaml and checkpoints/)")
    p.add_argument("--out", required=True, help="folder to write; replaced only after verification passes")
    p.add_argument("--tag", default=None,
                   help="checkpoint to export: a tag name, 'latest' or 'best' (default: latest complete)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="precision of the saved weights (default: the training precision)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="largest safetensors file to write, e.g. 5GB or 500MiB; more files get an index "
                        f"(default: {DEFAULT_MAX_SHARD_SIZE}, as transformers)")
    p.set_defaults(func=cmd_export)
