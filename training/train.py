"""Train a causal LM with DeepSpeed ZeRO: one process per rank, started by the `deepspeed` launcher.

    deepspeed --num_gpus 2 training/train.py --config run.yaml [--set train.lr=1e-5 ...]
    python -m training.train --config run.yaml          # one process, for debugging

Reads top to bottom: parse -> validate (config, data, tokenizer; before any process group) -> init
distributed -> build engine -> loop.run() -> close in finally. Exit codes: 0 done, 2 a user error (one
line on stderr), 85 preempted with a checkpoint saved (training.preemption.PREEMPTED_EXIT_CODE).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import remove_allreduce_buffers  # noqa: E402
from training.config import ConfigError, RunConfig, load_config, save_config  # noqa: E402
from training.data import DataError  # noqa: E402
from training.preflight import PreflightError  # noqa: E402
from training.steps import resolved_train  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Full fine-tuning with DeepSpeed ZeRO (one rank).")
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key (repeatable)")
    parser.add_argument("--no-preflight", action="store_true",
                        help="skip the start-up check (join with a short timeout, one all-reduce, report)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def validate_inputs(cfg: RunConfig, world_size: int):
    """Everything checkable before the process group starts: config arithmetic, manifest, tokenizer."""
    from transformers import AutoTokenizer

    from data_prep.format import check_shard_files, load_manifest
    from training.attention import choose_attention
    from training.loops import get_loop

    cfg.validate(world_size=world_size)
    # Micro-batch and accumulation for this world size (train.global_batch_size fixed); everything after
    # this (DeepSpeed's config, the driver, the saved config.yaml) sees the resolved values.
    cfg.train = resolved_train(cfg.train, world_size)
    manifest = load_manifest(cfg.data.output_dir)
    # Sizes and headers only (the full checksums are `zerotune launch`'s): a truncated or swapped shard is
    # one error on every rank here, not a memmap traceback on one rank and a dead peer on the others.
    check_shard_files(cfg.data.output_dir, manifest)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision,
                                                  trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DataError(f"model.name_or_path {cfg.model.name_or_path!r}: cannot load its tokenizer "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    check_tokenizer(manifest, tokenizer, cfg.data.output_dir, cfg.model.name_or_path)
    if manifest.get("seq_len") != cfg.data.seq_len:
        raise DataError(f"{Path(cfg.data.output_dir) / 'manifest.json'}: data was prepared with seq_len "
                        f"{manifest.get('seq_len')}, but data.seq_len is {cfg.data.seq_len}; run `zerotune prep "
                        f"CONFIG` again (or set data.seq_len back)")
    get_loop(cfg.train.loop)  # an unknown loop name fails here, before any process starts
    attention = choose_attention(cfg.model.attn_implementation)  # so does a kernel this machine cannot run
    if cfg.train.sequence_parallel_size > 1:
        check_sequence_parallel(cfg, attention.kernel)
    check_resume_setting(cfg)
    return manifest, tokenizer


def check_sequence_parallel(cfg: RunConfig, kernel: str) -> None:
    """Refuse a train.sequence_parallel_size that does not divide the model's heads (reads config.json only)."""
    from transformers import AutoConfig

    from training.sequence_parallel import check_model

    check_model(cfg.train.sequence_parallel_size, AutoConfig.from_pretrained(
        cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code), kernel)


def check_tokenizer(manifest: dict, tokenizer, data_dir: str, model_path: str) -> None:
    """Refuse shards tokenized by another tokenizer (vocabulary size or vocabulary/special-token hash)."""
    from data_prep.format import tokenizer_hash

    saved = manifest.get("tokenizer", {})
    ours = {"vocab_size": len(tokenizer), "hash": tokenizer_hash(tokenizer)}
    for key, value in ours.items():
        if saved.get(key) != value:
            raise DataError(f"{Path(data_dir) / 'manifest.json'}: data was prepared with a different tokenizer "
                            f"(tokenizer.{key} {saved.get(key)!r}, but {model_path!r} has {value!r}); run "
                            f"`zerotune prep CONFIG --force` with this model.name_or_path")


def check_resume_setting(cfg: RunConfig) -> None:
    """With checkpoint.resume: never, refuse a run dir that already holds checkpoints (nothing is overwritten)."""
    from training.checkpoint import ResumeError, checkpoint_root, complete_tags

    tags = complete_tags(checkpoint_root(cfg.output_dir))
    if cfg.checkpoint.resume == "never" and tags:
        raise ResumeError(f"checkpoint.resume: never, but {checkpoint_root(cfg.output_dir)} already holds "
                          f"checkpoints ({tags[-1]}); choose a new output_dir or set checkpoint.resume: auto")


def init_distributed(cfg: RunConfig, preflight: bool = True) -> None:
    """Start the process group (gloo on CPU, nccl on GPU) with deepspeed.timeout_minutes; with ``preflight``,
    first join with a short timeout and all-reduce once (training.preflight)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from training.heartbeat import enable_flight_recorder
    from training.preflight import run_preflight

    # Started without a launcher (python -m training.train): one rank, rendezvous on this machine.
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29511"}.items():
        os.environ.setdefault(key, value)
    enable_flight_recorder(cfg.output_dir)
    timeout = datetime.timedelta(minutes=cfg.deepspeed.timeout_minutes)
    if not preflight:
        deepspeed.init_distributed(timeout=timeout)
        return
    accelerator = get_accelerator()
    accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    # On CPU, DeepSpeed compiles its shared-memory op the first time (a minute): before the preflight's clock.
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()
    run_preflight(lambda t: deepspeed.init_distributed(timeout=t), accelerator.communication_backend_name(),
                  accelerator.device_name(int(os.environ["LOCAL_RANK"])), timeout,
                  print_fn=lambda text: print(text, flush=True))


def write_run_files(cfg: RunConfig, ds_config: dict, rank: int) -> None:
    """config.yaml and ds_config.json in the run dir (rank 0), as resolved."""
    if rank != 0:
        return
    out = Path(cfg.output_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2), encoding="utf-8")


def build_driver(cfg: RunConfig, manifest: dict, tokenizer):
    """Model, engine, loop and driver for this rank."""
    import torch.distributed as dist
    import yaml

    from transformers import set_seed

    from training.attention import choose_attention
    from training.checkpoint import checkpoint_root, resume_splits_decay
    from training.driver import Driver, RunContext
    from training.engine import build_engine, resolve_ds_config, zero_stage
    from training.heartbeat import Heartbeat
    from training.loops import get_loop
    from training.loss import describe_loss
    from training.model import load_model
    from training.sequence_parallel import setup as setup_sequence_parallel
    from training.tb import MetricsLogger

    world_size, rank = dist.get_world_size(), dist.get_rank()
    # python, numpy and torch (CPU and GPU) RNGs from train.seed, the same on every rank (as Trainer does):
    # two launches of one config draw the same dropout masks and loop randomness. A resume then replaces
    # these states with the checkpoint's.
    set_seed(cfg.train.seed)
    ds_config = resolve_ds_config(cfg.train, cfg.deepspeed, cfg.ds_config_path(), world_size)
    write_run_files(cfg, ds_config, rank)
    loop = get_loop(cfg.train.loop)(tokenizer=tokenizer)
    loop.loss_chunk_tokens = cfg.train.loss_chunk_tokens
    logger = MetricsLogger(cfg.tensorboard_dir(), Path(cfg.output_dir) / "metrics.jsonl", enabled=rank == 0)
    sp = cfg.train.sequence_parallel_size
    logger.line(f"{choose_attention(cfg.model.attn_implementation).describe()} | loss: "
                f"{describe_loss(cfg.train.loss_chunk_tokens)}"
                f"{f' | sequence parallel: groups of {sp} ranks' if sp > 1 else ''}")
    sequence_parallel = setup_sequence_parallel(cfg.train.sequence_parallel_size)  # a collective, before ZeRO-3
    model = load_model(cfg.model, cfg.train.precision, ds_config)
    model._zerotune_sequence_parallel = sequence_parallel
    shape = model_shape(model)
    logger.text("config", "```yaml\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "\n```", 0)
    ctx = RunContext(train=cfg.train, eval=cfg.eval, checkpoint=cfg.checkpoint, output_dir=Path(cfg.output_dir),
                     data_dir=Path(cfg.data.output_dir), manifest=manifest, config_hash=cfg.config_hash(),
                     zero_stage=zero_stage(ds_config), tokenizer=tokenizer, logger=logger, model_shape=shape,
                     log_every_steps=cfg.logging.log_every_steps,
                     # Stacks are dumped a little before a collective stuck this long would time out.
                     heartbeat=Heartbeat(cfg.output_dir, rank, world_size,
                                         stall_dump_s=0.9 * cfg.deepspeed.timeout_minutes * 60))
    steps = _total_steps(cfg, manifest, world_size)
    # (checkpoint.resume: never has no checkpoint to find: check_resume_setting refused such a run dir.)
    engine = build_engine(model, cfg.train, ds_config, steps, resume_splits_decay(checkpoint_root(cfg.output_dir)))
    model_dtype, accum_dtype = engine.get_data_types()
    logger.line(f"engine: model {model_dtype}, gradients accumulate in {accum_dtype}")
    return Driver(engine, loop, ctx, steps)


def _total_steps(cfg: RunConfig, manifest: dict, world_size: int) -> int:
    """Optimizer steps of the run (for the LR schedule), from training.steps.plan_steps."""
    from training.steps import plan_steps, train_sequences

    plan = plan_steps(cfg.train, train_sequences(manifest), world_size)
    if plan.steps_per_epoch < 1:
        raise DataError(f"{cfg.data.output_dir}: {plan.train_sequences} training sequences is less than one "
                        f"optimizer step (train.micro_batch_size {plan.micro_batch_size} x "
                        f"train.gradient_accumulation_steps {plan.gradient_accumulation_steps} x data-parallel "
                        f"{plan.world_size} = {plan.global_batch_size}); use more data or smaller batches")
    return plan.total_steps


def model_shape(model) -> dict:
    """Parameter count (real, also under ZeRO-3 partitioning), layers and hidden size, for MFU."""
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    conf = model.config
    return {"num_params": num_params, "num_layers": conf.num_hidden_layers, "hidden_size": conf.hidden_size}


def close_distributed(all_ranks_here: bool) -> None:
    """Barrier then destroy the process group: ZeRO-3 otherwise aborts at interpreter exit.

    After an unexpected error on one rank the others may never reach the barrier, so it is skipped and
    the error ends the process (the launcher then stops the other ranks).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            if all_ranks_here:
                dist.barrier()
        finally:
            dist.destroy_process_group()
            # This rank's own buffer only: other ranks may still be using theirs.
            remove_allreduce_buffers(os.environ.get("MASTER_PORT"), os.environ.get("MASTER_ADDR"),
                                     os.environ.get("LOCAL_RANK"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    driver, clean = None, False
    try:
        cfg = load_config(args.config, args.overrides)
        manifest, tokenizer = validate_inputs(cfg, world_size)
        init_distributed(cfg, preflight=not args.no_preflight)
        driver = build_driver(cfg, manifest, tokenizer)
        code = driver.run()
        clean = True
        return code
    except Exception as exc:  # a user error is one line, not a traceback from three layers down
        if isinstance(exc, ConfigError) or getattr(exc, "user_error", False):
            # User errors are found alike on every rank, except a failed preflight: no peer to wait for.
            clean = not isinstance(exc, PreflightError)
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
        raise
    finally:
        if driver is not None:
            driver.ctx.logger.close()
            driver.ctx.heartbeat.close()
        close_distributed(all_ranks_here=clean)


if __name__ == "__main__":
    sys.exit(main())
