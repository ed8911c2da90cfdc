"""Write a real run directory with DeepSpeed ZeRO checkpoints, for the export tests.

Started by the tests as ``deepspeed --num_gpus 2 export_checkpoint_writer.py --model-dir M --run-dir R
--stage S --precision P``. It trains the tiny model a few steps with ``training.model`` and saves two
checkpoints laid out as the training driver lays them out (``checkpoints/<tag>/`` with DeepSpeed's files,
``zerotune_state.json``, ``probe.safetensors`` and ``COMPLETE``; the ``latest`` pointer; the best weights
of step 2 under ``checkpoints/best-weights/`` with the ``best`` pointer), plus ``reference.safetensors``:
logits of the final weights on a second batch, and ``best_reloaded_probe.safetensors``: the probe batch's
logits after the step-2 best weights were loaded back into the trained engine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch

from training.best_weights import best_folder, load_best_weights, save_best_weights
from training.checkpoint import tag_for_step
from training.config import RunConfig, save_config
from training.model import forward_logits, load_model, token_loss
from training.probe import save_probe

REPO_ROOT = Path(__file__).resolve().parents[2]


def _ds_config(stage: int, precision: str, world_size: int) -> dict:
    cfg = json.loads((REPO_ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
               train_batch_size=world_size, gradient_clipping=1.0,
               optimizer={"type": "AdamW", "params": {"lr": 5e-3, "torch_adam": True, "weight_decay": 0.0}})
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def _batch(vocab_size: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (1, 24), generator=gen)
    labels = ids.clone()
    labels[0, 0] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(24)[None],
            "attention_mask": torch.ones_like(ids)}


def _save(engine, ckpt_root: Path, tag: str, step: int, probe_ids: torch.Tensor) -> None:
    engine.save_checkpoint(str(ckpt_root), tag)
    save_probe(engine, probe_ids, ckpt_root / tag / "probe.safetensors")
    if torch.distributed.get_rank() == 0:
        (ckpt_root / tag / "zerotune_state.json").write_text(json.dumps({"step": step}))
        (ckpt_root / tag / "COMPLETE").write_text("")
        (ckpt_root / "latest").write_text(tag)
    torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    run_dir, world = Path(args.run_dir), torch.distributed.get_world_size()
    ds_config = _ds_config(args.stage, args.precision, world)
    cfg = RunConfig(output_dir=str(run_dir))
    cfg.model.name_or_path, cfg.train.precision = args.model_dir, args.precision
    cfg.deepspeed.config, cfg.deepspeed.zero_stage = f"zero{args.stage}.json", args.stage
    if torch.distributed.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))

    torch.manual_seed(0)
    model = load_model(cfg.model, args.precision, ds_config)
    if torch.distributed.get_rank() == 0:  # lets the test check that ZeRO-3 built the model partitioned
        (run_dir / "load_info.json").write_text(json.dumps({
            "zero3_params": sum(hasattr(p, "ds_id") for p in model.parameters()),
            "params": len(list(model.parameters())),
            "local_numel": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype)}))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    vocab = model.config.vocab_size
    probe_ids = torch.randint(5, vocab, (2, 12), generator=torch.Generator().manual_seed(99))
    ckpt_root = run_dir / "checkpoints"
    for step in range(1, 5):
        batch = _batch(vocab, seed=step * 10 + torch.distributed.get_rank())
        loss_sum, count = token_loss(forward_logits(engine, batch), batch["labels"])
        engine.backward(loss_sum / count)
        engine.step()
        if step in (2, 4):
            _save(engine, ckpt_root, tag_for_step(step), step, probe_ids)
        if step == 2:  # as the driver saves a new best evaluation: weights only, and the `best` pointer
            save_best_weights(engine.module, ckpt_root, tag_for_step(step), {"step": step}, probe_ids,
                              torch.distributed.get_rank())
    reference_ids = torch.randint(5, vocab, (1, 16), generator=torch.Generator().manual_seed(7))
    save_probe(engine, reference_ids, run_dir / "reference.safetensors")
    # As the test split is evaluated: the best weights loaded back into the trained engine, no optimizer.
    load_best_weights(engine.module, best_folder(ckpt_root, tag_for_step(2)), torch.distributed.get_rank())
    save_probe(engine, probe_ids, run_dir / "best_reloaded_probe.safetensors")
    torch.distributed.barrier()
    # Without this, ZeRO-3 aborts at interpreter exit on gloo.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
