"""`zerotune export RUN_DIR --out DIR`: a checkpoint of any ZeRO stage as a Hugging Face model folder."""

from __future__ import annotations


def cmd_export(args) -> int:
    """Export, verify, and print where the folder is and how it checked out."""
    from training.export import export_checkpoint

    result = export_checkpoint(args.run_dir, args.out, tag=args.tag, dtype=args.dtype)
    for note in result.notes:
        print(f"note: {note}")
    print(f"exported checkpoint {result.tag} (ZeRO stage {result.zero_stage}) to {result.out_dir}: "
          f"{result.num_params:,} parameters in {result.dtype}, probe logits within "
          f"{result.probe_relative_error:.2g} of the trained model's")
    return 0


def register(subparsers, add_config_args) -> None:  # noqa: ARG001 - export reads the run dir, not a config
    """Add the `export` subcommand."""
    p = subparsers.add_parser(
        "export", help="consolidate a checkpoint (any ZeRO stage) into a Hugging Face model folder",
        description="Gather the checkpoint's weights with DeepSpeed's own consolidation, add the run's "
                    "tokenizer and generation config, and verify the folder (every parameter present, none "
                    "empty, the probe batch's logits match the trained model's, generate works) before "
                    "renaming it into place. An incomplete checkpoint (no COMPLETE marker) is refused.")
    p.add_argument("run_dir", help="the run's output_dir (holds config.yaml and checkpoints/)")
    p.add_argument("--out", required=True, help="folder to write; replaced only after verification passes")
    p.add_argument("--tag", default=None,
                   help="checkpoint to export: a tag name, 'latest' or 'best' (default: latest complete)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="precision of the saved weights (default: the training precision)")
    p.set_defaults(func=cmd_export)
