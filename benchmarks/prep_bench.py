"""Prep throughput and peak memory, on the bundled sample and on a synthetic enlargement of it.

Run by hand (not a test):  python benchmarks/prep_bench.py [--scales 1 100] [--num-proc 1 [2]] [--seq-len 512]
[--core [--pairs K] [--beside]]
Before/after:  python benchmarks/prep_bench.py --scales 100 --baseline DIR [--pairs 3]
(DIR: another checkout, e.g. `git worktree add /tmp/base main`; each pair runs the baseline's prep, then
this checkout's, on the same data and tokenizer, and prints the ratios after/before.)

Each case runs `prepare` in a fresh child process; this script samples the RSS of that process and all its
children every 20 ms and reports the high-water mark (the sum over the tree), the wall time, and tokens/s
(all templated tokens written, every split); CPU seconds count the prep process and its worker processes
(data.num_proc > 1). With several ``--num-proc`` values each scale runs once per value, and the last
scale's wall and CPU rates are printed as ratios to the first value's (``--num-proc 1 2``: the scaling of
data.num_proc 2; its wall ratio wants an otherwise idle machine). ``--core`` also times prep's core work on
the largest scale's rows in one process: rendering the chat template and tokenizing (``Templater.render``
+ ``encode_batch`` in batches of data.map_batch_size, on records cleaned beforehand, untimed), alternating
with prep runs (``--pairs`` of them, the first being the scale's own run), and prints end to end / core as a
ratio of tokens/s and of tokens per CPU-second for each pair and their median. ``--beside`` runs the core
work over and over next to each prep instead (one process each, so on 2+ cores), so both meet the same
moments of a machine whose speed drifts. The enlargement
repeats every row with varied numbers and words, so deduplication keeps the copies and the work really
grows with the scale.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = REPO_ROOT / "examples" / "data" / "data_science_questions.csv"
_SWAPS = ["for example", "in practice", "as a rule", "typically", "in short", "notably", "often", "usually"]

CHILD = """
import json, os, sys, time
from data_prep.config import DataConfig
from data_prep.pipeline import prepare
cfg = DataConfig(**json.loads(sys.argv[1]))
cpu = lambda: sum(os.times()[:4])  # this process and its finished children (datasets' worker processes)
t0, c0 = time.perf_counter(), cpu()
m = prepare(cfg, sys.argv[2], force=True)
print("RESULT", json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": cpu() - c0,
      "tokens": sum(s["tokens"] for s in m["splits"].values()),
      "documents": sum(s["documents"] for s in m["splits"].values())}))
"""

CORE = """
import csv, json, os, sys, time, types
from pathlib import Path
from data_prep.clean import Normalizer, clean_batch
from data_prep.config import DataConfig
from data_prep.pipeline import load_tokenizer, make_templater
from data_prep.procs import one_tokenizer_thread
from data_prep.readers import Source, resolve_columns, source_settings
# The tokenizer threads prep itself runs with, for a like-for-like rate (held: a discarded context manager
# would restore the environment when collected).
threads = one_tokenizer_thread()
threads.__enter__()
cfg = DataConfig(**json.loads(sys.argv[1]))
tok = load_tokenizer(sys.argv[2])
with open(cfg.sources[0], newline="", encoding="utf-8") as fh:
    rows = list(csv.DictReader(fh))
src = Source(Path(cfg.sources[0]), "csv")
cols = resolve_columns(types.SimpleNamespace(column_names=list(rows[0])), source_settings(cfg, 0), src)
templater, normalize, records = make_templater(cfg, tok, [cols.kind]), Normalizer([]), []
for start in range(0, len(rows), cfg.map_batch_size):
    chunk = rows[start:start + cfg.map_batch_size]
    batch = {k: [r[k] for r in chunk] for k in rows[0]}
    out = clean_batch(batch, list(range(len(chunk))), columns=cols, src=src, src_id=0, normalize=normalize)
    records.append([{c: out[c][i] for c in ("messages", "tools", "text")} for i in range(len(chunk))])
del rows
t0, c0, tokens = time.perf_counter(), time.process_time(), 0
for group in records:
    rendered = [templater.render(r) for r in group]
    tokens += sum(len(ids) for ids, _ in templater.encode_batch(rendered, [not r["messages"] for r in group]))
print("RESULT", json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
      "tokens": tokens, "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM")}))
"""


def enlarge(src: Path, dst: Path, scale: int) -> int:
    """Write ``scale`` varied copies of every row of ``src``; returns the rows written."""
    with open(src, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    written = 0
    with open(dst, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for k in range(scale):
            for i, row in enumerate(rows):
                if k == 0:
                    writer.writerow(row)
                else:
                    swap = _SWAPS[(i + k) % len(_SWAPS)]
                    writer.writerow({"question": f"{row['question']} (case {k}.{i})",
                                     "answer": f"{row['answer']} {swap.capitalize()}, case {k * 7 + i} applies."})
                written += 1
    return written


def _launch(script: str, data: Path, model: Path, out: Path, seq_len: int, num_proc, code_root: Path):
    cfg = {"sources": [str(data)], "output_dir": str(out), "seq_len": seq_len, "prompt_column": "question",
           "response_column": "answer", "num_proc": num_proc, "validation_fraction": 0.1, "test_fraction": 0.1}
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    return subprocess.Popen([sys.executable, "-c", script, json.dumps(cfg), str(model)], cwd=code_root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _result(proc) -> dict:
    stdout = proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"prep failed (exit {proc.returncode}):\n{stdout[-2000:]}")
    result = json.loads(next(l for l in stdout.splitlines() if l.startswith("RESULT"))[len("RESULT "):])
    result["tokens_per_s"] = round(result["tokens"] / result["seconds"])
    result["tokens_per_cpu_s"] = round(result["tokens"] / result["cpu_seconds"])
    return result


class CoreBeside:
    """The core script run again and again in its own process while a prep runs (``--core --beside``): the
    two share the same moments of the machine, so its drifting speed cancels in their ratio, and prep never
    runs alone. The core's rate is that of its completed runs; the one still going when prep ends is
    stopped and left out."""

    def __init__(self, data: Path, model: Path, out: Path, seq_len: int):
        self.args, self.proc, self.runs = (CORE, data, model, out, seq_len, 1, REPO_ROOT), None, []

    def poll(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self.runs.append(_result(self.proc))
            self.proc = None
        if self.proc is None:
            self.proc = _launch(*self.args)

    def stop(self) -> dict:
        self.proc.kill()
        self.proc.wait()
        if not self.runs:
            raise SystemExit("no core run finished beside prep: use a larger --scales")
        total = {k: sum(r[k] for r in self.runs) for k in ("tokens", "seconds", "cpu_seconds")}
        return {**total, "runs": len(self.runs), "tokenizers_parallelism": self.runs[0]["tokenizers_parallelism"],
                "tokens_per_s": round(total["tokens"] / total["seconds"]),
                "tokens_per_cpu_s": round(total["tokens"] / total["cpu_seconds"])}


def run_case(data: Path, model: Path, out: Path, seq_len: int, num_proc, code_root: Path = REPO_ROOT,
             script: str = CHILD, beside: CoreBeside | None = None) -> dict:
    """Prepare ``data`` in a child process running the prep code of ``code_root`` (or time the core work,
    script=CORE); return its timing (wall and CPU seconds of the main process), tokens and the tree's peak
    RSS (the tree of the prep process only, when ``beside`` runs the core next to it)."""
    proc = _launch(script, data, model, out, seq_len, num_proc, code_root)
    peak_bytes, ps = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [ps] + ps.children(recursive=True)
            peak_bytes = max(peak_bytes, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        if beside is not None:
            beside.poll()
        time.sleep(0.02)
    result = _result(proc)
    result["peak_rss_mib"] = round(peak_bytes / 2**20, 1)
    return result


def compare(data: Path, model: Path, tmp: Path, args) -> None:
    """Alternate baseline and this checkout on one data file; print each run and the after/before ratios."""
    ratios = []
    for pair in range(args.pairs):
        runs = {}
        for side, root in (("before", Path(args.baseline).resolve()), ("after", REPO_ROOT)):
            runs[side] = r = run_case(data, model, tmp / f"out-{side}-{pair}", args.seq_len, args.num_proc[0], root)
            print(f"pair {pair} {side:<6} tokens {r['tokens']:>9}  {r['seconds']:7.1f} s  {r['cpu_seconds']:7.1f} "
                  f"CPU s  {r['tokens_per_s']:>8} tokens/s  {r['tokens_per_cpu_s']:>8} tokens/CPU-s  "
                  f"peak RSS {r['peak_rss_mib']:7.1f} MiB", flush=True)
        ratios.append((runs["after"]["tokens_per_s"] / runs["before"]["tokens_per_s"],
                       runs["after"]["tokens_per_cpu_s"] / runs["before"]["tokens_per_cpu_s"]))
    wall, cpu = sorted(r[0] for r in ratios), sorted(r[1] for r in ratios)
    print(f"after/before, median (min-max) over {len(ratios)} pairs: tokens/s {wall[len(wall) // 2]:.3f} "
          f"({wall[0]:.3f}-{wall[-1]:.3f}); tokens per CPU-second {cpu[len(cpu) // 2]:.3f} "
          f"({cpu[0]:.3f}-{cpu[-1]:.3f})")


def core_ratios(data: Path, model: Path, tmp: Path, args, first_prep: dict | None) -> None:
    """Time the core work on ``data`` after the prep run ``first_prep``, then ``--pairs`` - 1 more (prep, core)
    pairs back to back (with ``--beside``: ``--pairs`` preps, each with the core running beside it); print
    each pair's end to end / core ratios and their median (the machine's speed drifts between runs, so one
    pair says little)."""
    ratios = []
    for pair in range(max(1, args.pairs)):
        if args.beside:
            beside = CoreBeside(data, model, tmp / "core", args.seq_len)
            prep = run_case(data, model, tmp / "out-core-pair", args.seq_len, args.num_proc[0], beside=beside)
            core = beside.stop()
        else:
            prep = first_prep if pair == 0 else run_case(data, model, tmp / "out-core-pair", args.seq_len,
                                                          args.num_proc[0])
            core = run_case(data, model, tmp / "core", args.seq_len, 1, script=CORE)
        ratios.append((prep["tokens_per_s"] / core["tokens_per_s"],
                       prep["tokens_per_cpu_s"] / core["tokens_per_cpu_s"]))
        print(f"pair {pair}: prep {prep['seconds']:7.1f} s {prep['cpu_seconds']:7.1f} CPU s; core (render + tokenize, "
              f"1 process{', ' + str(core['runs']) + ' runs beside prep' if args.beside else ''}) tokens "
              f"{core['tokens']:>9}  {core['seconds']:7.1f} s  {core['cpu_seconds']:7.1f} CPU s  "
              f"{core['tokens_per_s']:>8} tokens/s  {core['tokens_per_cpu_s']:>8} tokens/CPU-s (TOKENIZERS_PARALLELISM="
              f"{core['tokenizers_parallelism']}); end to end / core: {ratios[-1][0]:.3f} per wall second, "
              f"{ratios[-1][1]:.3f} per CPU second; load average {os.getloadavg()[0]:.1f}", flush=True)
    wall, cpu = sorted(r[0] for r in ratios), sorted(r[1] for r in ratios)
    print(f"end to end / core, median (min-max) over {len(ratios)} pairs: per wall second {wall[len(wall) // 2]:.3f} "
          f"({wall[0]:.3f}-{wall[-1]:.3f}), per CPU second {cpu[len(cpu) // 2]:.3f} ({cpu[0]:.3f}-{cpu[-1]:.3f})",
          flush=True)


def main() -> None:
    """Run the scales asked for and print one line each, then the marginal rate and the memory ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--num-proc", type=lambda v: v if v == "auto" else int(v), nargs="+", default=[1],
                        help="data.num_proc values to run each scale with (ints or auto)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--baseline", help="another checkout to compare against (before/after pairs)")
    parser.add_argument("--pairs", type=int, default=3, help="before/after pairs with --baseline; (prep, core) "
                        "pairs with --core")
    parser.add_argument("--core", action="store_true", help="also time render + tokenize of the largest scale, "
                        "alternating with prep --pairs times")
    parser.add_argument("--beside", action="store_true", help="with --core: run the core work beside each prep "
                        "(one process each, on a machine with 2+ cores) instead of after it")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    # Inherited by every child: unset, prep and the core script alike tokenize on one thread per process
    # (data_prep.procs.one_tokenizer_thread); set, both follow it.
    print(f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}", flush=True)
    from training.tiny_model import write_tiny_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_model(tmp / "model", [str(SAMPLE)], vocab_size=2048, hidden_size=64, num_layers=2)
        if args.baseline:
            data = tmp / f"x{args.scales[-1]}.csv"
            print(f"{enlarge(SAMPLE, data, args.scales[-1])} rows ({args.scales[-1]}x)", flush=True)
            return compare(data, model, tmp, args)
        for scale in args.scales:
            data = tmp / f"x{scale}.csv"
            rows = enlarge(SAMPLE, data, scale)
            if args.core and args.beside and scale == args.scales[-1]:
                print(f"scale {scale:>4}x  rows {rows:>7}: its preps run in the pairs below", flush=True)
                break
            by_procs = {}
            for procs in args.num_proc:
                by_procs[procs] = r = run_case(data, model, tmp / f"out{scale}", args.seq_len, procs)
                print(f"scale {scale:>4}x  num_proc {procs}  rows {rows:>7}  docs {r['documents']:>7}  tokens "
                      f"{r['tokens']:>9}  {r['seconds']:7.1f} s  {r['cpu_seconds']:7.1f} CPU s  {r['tokens_per_s']:>8} "
                      f"tokens/s  {r['tokens_per_cpu_s']:>8} tokens/CPU-s  peak RSS {r['peak_rss_mib']:7.1f} MiB  "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
            results.append(by_procs[args.num_proc[0]])
        first = by_procs[args.num_proc[0]] if results else {}
        for procs, r in list(by_procs.items())[1:] if results else []:
            print(f"num_proc {procs} / num_proc {args.num_proc[0]} at {args.scales[-1]}x: wall rate "
                  f"{r['tokens_per_s'] / first['tokens_per_s']:.3f}x, rate per CPU-second "
                  f"{r['tokens_per_cpu_s'] / first['tokens_per_cpu_s']:.3f}x", flush=True)
        if args.core:
            core_ratios(data, model, tmp, args, None if args.beside else results[-1])
    if len(results) > 1:
        # Start-up (imports, tokenizer load, report) costs the same at every scale: the slope is the rate.
        d_tokens = results[-1]["tokens"] - results[0]["tokens"]
        d_seconds = results[-1]["seconds"] - results[0]["seconds"]
        print(f"marginal throughput {args.scales[0]}x -> {args.scales[-1]}x: {d_tokens / d_seconds:,.0f} tokens/s; "
              f"peak RSS ratio {results[-1]['peak_rss_mib'] / results[0]['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
