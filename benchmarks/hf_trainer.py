"""The peer side of the benchmarks: the Hugging Face tutorial recipe, `transformers.Trainer` + DeepSpeed.

Started by the same launcher as zerotune (one process per rank):

    deepspeed --num_gpus 2 benchmarks/hf_trainer.py --model M --data PREPARED --out DIR --batch-size B \
        --max-steps N [--mode sft|pretrain] [--save-model]

It trains on the very documents `zerotune prep` wrote (unpacked at document boundaries, one document per
row), so both sides see the same tokens and the same prompt masking: the tutorial's tokenized
prompt + response with the chat template and the prompt's labels at -100. Batches are padded per batch by
`DataCollatorForSeq2Seq`; there is no packing. The ZeRO-2 JSON is the project's own (its "auto" values are
filled by Trainer), the optimizer is torch AdamW with the same betas/eps, and the LR schedule is
zerotune's `lr_multiplier` (warmup then cosine to min_lr_ratio), so only the framework differs.

Rank 0 prints ``benchstep <n>`` after every optimizer step (the harness stamps it); each rank writes its
per-step token counts to ``step_tokens-rank<r>.json`` at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import peer_arg_parser, split_documents  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = peer_arg_parser(__doc__.splitlines()[0], "a zerotune prep output folder")
    p.add_argument("--mode", choices=("sft", "pretrain"), default="sft")
    p.add_argument("--batch-size", type=int, required=True, help="documents per rank per optimizer step")
    p.add_argument("--save-model", action="store_true", help="save the trained model to OUT/model")
    return p.parse_args(argv)


def train_dataset(data_dir: str, mode: str):
    """The train split's documents as a datasets.Dataset of input_ids and labels."""
    from datasets import Dataset

    from data_prep.format import IGNORE_INDEX, load_manifest

    docs = split_documents(Path(data_dir), load_manifest(data_dir), "train")
    if mode == "pretrain":  # every token but the first is a target, as zerotune's pretrain loop does
        for d in docs:
            d["labels"] = d["input_ids"].copy()
            d["labels"][0] = IGNORE_INDEX
    return Dataset.from_dict({"input_ids": [d["input_ids"].tolist() for d in docs],
                              "labels": [d["labels"].tolist() for d in docs]})


def make_trainer_class():
    from transformers import Trainer

    from training.engine import lr_multiplier

    class CountingTrainer(Trainer):
        """Trainer that records each training micro-batch's token counts and uses zerotune's LR schedule."""

        pending: list[dict]
        bench_warmup_steps: int
        bench_min_lr_ratio: float

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                labels, mask = inputs["labels"], inputs["attention_mask"]
                self.pending.append({"supervised": int((labels[:, 1:] != -100).sum()),
                                     "real": int(mask.sum()), "padded": int(mask.numel())})
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def create_scheduler(self, num_training_steps, optimizer=None):
            import torch

            if self.lr_scheduler is None:
                warmup, floor = self.bench_warmup_steps, self.bench_min_lr_ratio
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer,
                    lambda step: lr_multiplier(step, num_training_steps, warmup, "cosine", floor))
            return self.lr_scheduler

    return CountingTrainer


def step_callback(trainer, per_step: dict, rank: int):
    from transformers import TrainerCallback

    class StepStamp(TrainerCallback):
        """Assign the pending micro-batch counts to the step that just ended; rank 0 prints its number."""

        def on_step_end(self, args, state, control, **kwargs):
            counts = trainer.pending
            per_step[state.global_step] = {k: sum(c[k] for c in counts) for k in ("supervised", "real", "padded")}
            trainer.pending = []
            if rank == 0:
                print(f"benchstep {state.global_step}", flush=True)

    return StepStamp()


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainingArguments

    out = Path(args.out)
    ds_config = json.loads(Path(args.ds_config).read_text(encoding="utf-8"))
    targs = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_steps=args.max_steps, learning_rate=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        max_grad_norm=1.0, optim="adamw_torch", seed=args.seed, data_seed=args.seed, use_cpu=True,
        deepspeed=ds_config, logging_steps=10, save_strategy="no", eval_strategy="no", report_to="none",
        dataloader_num_workers=0, disable_tqdm=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa")
    model.config.use_cache = False
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = make_trainer_class()(model=model, args=targs, train_dataset=train_dataset(args.data, args.mode),
                                   data_collator=collator)
    trainer.pending, trainer.bench_warmup_steps, trainer.bench_min_lr_ratio = [], args.warmup_steps, args.min_lr_ratio
    per_step: dict[int, dict] = {}
    rank = targs.process_index
    trainer.add_callback(step_callback(trainer, per_step, rank))
    trainer.train()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_tokens-rank{rank}.json").write_text(json.dumps(per_step), encoding="utf-8")
    if args.save_model:
        trainer.save_model(str(out / "model"))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
