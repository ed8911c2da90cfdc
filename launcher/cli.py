"""The `zerotune` command: one subcommand per step of a fine-tune (prep, plan, launch, export, ...).

Each subcommand is a thin shell: it parses arguments, loads the run config strictly, and calls one
function of the package that does the work. Errors a user can cause print one clear message and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

EXAMPLES = """\
examples:
  zerotune tiny-model models/tiny --train-text examples/data/data_science_questions.csv
  zerotune prep examples/demo.yaml
  zerotune prep examples/demo.yaml --set data.seq_len=256 --set data.packing=false
  zerotune prep examples/demo.yaml --slurm --nodes 4 --time 01:00:00
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (YAML); see examples/ for annotated ones")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value by its dotted key, e.g. --set train.lr=1e-5 "
                        "(repeatable; VALUE is parsed as YAML)")


def _load(args):
    from training.config import load_config

    return load_config(args.config, args.overrides)


def cmd_prep(args) -> int:
    from data_prep.pipeline import prepare
    from launcher import prep_slurm

    cfg = _load(args)
    if prep_slurm.is_distributed(args):
        return prep_slurm.run(args, cfg)
    prepare(cfg.data, tokenizer_path=cfg.model.name_or_path, force=args.force, revision=cfg.model.revision)
    return 0


def cmd_tiny_model(args) -> int:
    from training.tiny_model import write_tiny_model

    write_tiny_model(args.out_dir, args.train_text, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                     num_layers=args.num_layers, seed=args.seed)
    print(f"wrote a tiny Llama model and tokenizer to {args.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zerotune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Full fine-tuning of causal LMs with DeepSpeed ZeRO: prepare data, plan memory, "
                    "launch on one node or many, export a Hugging Face folder.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prep", help="clean, template, tokenize, split and pack data into shards",
                       description="Prepare data.sources into memory-mapped shards under data.output_dir, "
                                   "with manifest.json and a data report. Does nothing when the cache key "
                                   "(inputs, tokenizer, template, settings) is unchanged.")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if the cache key matches")
    from launcher.prep_slurm import add_arguments as add_distributed_prep_arguments

    add_distributed_prep_arguments(p)
    p.set_defaults(func=cmd_prep)

    p = sub.add_parser("tiny-model", help="write a tiny random-init Llama and a BPE tokenizer (offline demo/tests)",
                       description="Train a byte-level BPE tokenizer on the given text files and write it with "
                                   "a tiny random-weight Llama model that transformers loads from the folder.")
    p.add_argument("out_dir", help="folder to write (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--train-text", nargs="+", required=True, metavar="FILE",
                   help="text, CSV or JSONL files whose text trains the tokenizer")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    for register in _EXTRA_COMMANDS:
        register(sub, _add_config_args)
    return parser


# Later subcommands (plan, launch, export, slurm) register themselves here: each entry is
# a function (subparsers, add_config_args) -> None that adds its parser and sets `func`.
_EXTRA_COMMANDS: list[Callable] = []


def _register_optional() -> None:
    import importlib

    _EXTRA_COMMANDS.clear()  # main() may run more than once in one process (tests)
    for module in ("training.export_cli", "launcher.plan_cli", "launcher.launch_cli", "launcher.slurm_cli",
                   "launcher.status"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        _EXTRA_COMMANDS.append(mod.register)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `zerotune` command."""
    from training.config import ConfigError

    _register_optional()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"zerotune {args.command}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - only errors marked as the user's are shown without a traceback
        if not getattr(exc, "user_error", False):
            raise
        print(f"zerotune {args.command}: error: {exc}", file=sys.stderr)
        return 2


class UserError(Exception):
    """An error the user can fix (cluster problems, missing files): printed as one message, exit 2.

    Every package marks its own user-facing errors with ``user_error = True`` (data_prep's DataError,
    the shard format's ManifestError, ...) so this package need not be imported upstream.
    """

    user_error = True


if __name__ == "__main__":
    sys.exit(main())
