"""Per-rank host memory of loading the model under ZeRO-3 (training.model.load_model), on 2 CPU ranks.

    python benchmarks/load_memory.py                 # the export benchmark's 184M and ~2x models
    python benchmarks/load_memory.py --layers 2 --hidden 128 --vocab 2048    # quick

Each rank reports its peak RSS (getrusage) after importing and initialising the process group, and after
``load_model`` built the partitioned model (the model's modeling code is imported before the first); the difference is what loading costs. A rank's share of the
model is params x bytes / 2. Models are the ones benchmarks/export_memory.py builds (built here if absent).

Both loaders run on every model, alternately in the same invocation: ``streaming`` (training.zero3_load,
what ``load_model`` does under ZeRO-3 today) and ``transformers`` (``from_pretrained`` with a live
``HfDeepSpeedConfig``, what it did before), with the ratio after / before of what loading added.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LINE = re.compile(r"loadpeak (\[.*\])")
NO_STEPS = re.compile(r"(?!)")  # ranks print no step lines: nothing for benchlib.launch to stamp
LOADERS = ("transformers", "streaming")  # before, after


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[16, 32])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / ".work")
    p.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS))
    p.add_argument("--rank-model", default=None, help=argparse.SUPPRESS)  # set when run as a rank
    p.add_argument("--rank-loader", choices=LOADERS, default="streaming", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _import_model_class(folder: str) -> None:
    """Import the model's modeling code first, so its ~0.1 GB is not counted as loading."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(folder))]


def rank_main(args) -> None:
    """One rank: load the model partitioned, print the peaks."""
    import deepspeed
    import torch

    import training.model
    from training.config import ModelConfig
    from training.model import load_model

    if args.rank_loader == "transformers":  # what load_model did before the streaming loader
        training.model._load_zero3_streaming = lambda *a: None

    deepspeed.init_distributed(dist_backend="gloo")
    world = torch.distributed.get_world_size()
    ds_config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1,
                 "gradient_accumulation_steps": 1, "train_batch_size": world}
    if args.precision == "bf16":
        ds_config["bf16"] = {"enabled": True}
    _import_model_class(args.rank_model)
    before, started = _peak_gb(), time.perf_counter()
    model = load_model(ModelConfig(name_or_path=args.rank_model), args.precision, ds_config)
    after, seconds = _peak_gb(), time.perf_counter() - started
    mine = {"rank": torch.distributed.get_rank(), "before_gb": before, "after_gb": after, "seconds": seconds,
            "local_numel": sum(p.numel() for p in model.parameters())}
    ranks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, mine)  # one line from rank 0: two ranks' prints interleave
    if mine["rank"] == 0:
        print("loadpeak " + json.dumps(ranks), flush=True)
    torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rank_model:
        rank_main(args)
        return 0
    import benchlib as bl

    for layers in args.layers:
        model = bl.model_dir(args.work, args.hidden, layers, args.vocab)
        params = bl.model_params(model)
        share = params * (2 if args.precision == "bf16" else 4) / 2 / 1e9
        added = {}
        for loader in args.loaders:
            for r in _run(bl, args, model, loader):
                added[loader, r["rank"]] = r["after_gb"] - r["before_gb"]
                print(f"{model.name} ({params / 1e6:.0f}M, {args.precision}) {loader} rank {r['rank']}: "
                      f"peak {r['after_gb']:.2f} GB, loading added {r['after_gb'] - r['before_gb']:.2f} GB "
                      f"in {r['seconds']:.1f} s; "
                      f"the rank's share of the weights is {share:.2f} GB, the whole model {2 * share:.2f} GB",
                      flush=True)
        print(f"{model.name}: zerotune plan's ZeRO-3 loading figure per rank, above the import baseline: "
              f"{_planned_gb(model, args.precision):.2f} GB", flush=True)
        for rank in sorted({rank for _, rank in added}):
            if ("streaming", rank) in added and ("transformers", rank) in added:
                print(f"{model.name} rank {rank}: loading added, streaming / transformers = "
                      f"{added['streaming', rank] / added['transformers', rank]:.2f}")
    return 0


def _planned_gb(model: Path, precision: str) -> float:
    from launcher.plan import GB, IMPORT_BASELINE_GB, loading_bytes_per_rank, model_shape

    width = 4 if precision == "fp32" else 2
    return loading_bytes_per_rank(model_shape(str(model)), width, 3, total_gpus=2) / 1e9 - IMPORT_BASELINE_GB * GB / 1e9


def _run(bl, args, model: Path, loader: str) -> list[dict]:
    log = args.work / "logs" / f"load-{model.name}-{args.precision}-{loader}.log"
    bl.launch(f"load {model.name} {loader}", Path(__file__),
              ["--rank-model", str(model), "--precision", args.precision, "--rank-loader", loader],
              log, pattern=NO_STEPS)
    (ranks,) = [json.loads(m.group(1)) for m in map(LINE.search, log.read_text().splitlines()) if m]
    return ranks


if __name__ == "__main__":
    sys.exit(main())
