"""Distributed prep: split once, run the units on any number of workers, finish once.

Three steps, each restartable:
  * :func:`split_step` (one process): read and clean every source, drop bad, empty and duplicate rows over
    the whole input (a hash array, 8 bytes per row), give each kept document its split and its unit from its
    content hash, and save the kept documents with those arrays under the work folder.
  * :func:`units_step` (any number of workers, e.g. one srun task per node): template, tokenize and pack
    each unfinished unit the worker owns into one shard per split; a unit is renamed into place only when
    complete (units.py), so a killed worker's unit is simply run again by the next attempt.
  * :func:`finish_step` (one process): only when every unit is finished, link the shards into a fresh output
    folder, merge the counts and the report's per-document arrays (cross-split overlap, near duplicates,
    lengths), write manifest.json last and publish the folder atomically (outdir.py).

The output depends on the inputs and settings only: documents go to units by hash and every unit is packed
on its own, so 1 worker and N workers write the same bytes. The layout (one packed shard per unit) is part
of the cache key, so it never passes for a single-process prep's output or the reverse.

At scale: the split step's dedup sorts the usable rows' 8-byte hashes (~25 bytes a row while it sorts: the
hashes, their sort order and the sorted copy) and it holds 13 bytes per kept document for the unit, split
and order arrays; each worker holds one unit's tokenized batch at a time (the stages stream through datasets on
disk); the finish step holds the report's per-document arrays (about 40 bytes per document) and copies no
shard bytes (hard links on the same filesystem).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import report as report_mod
from .clean import cleaning_steps
from .errors import DataError
from .format import SPLITS, shard_files
from .outdir import check_replaceable, make_work_dir, publish
from .pack import no_packing, pack_best_fit, packing_efficiency
from .pages import PageReleaser
from .procs import describe, one_tokenizer_thread, resolve_num_proc
from .pipeline import (_complete_manifest, _empty_data_error, _manifest, _sha256_json, _source_counts, _tokenize,
                       cache_key_parts, clean_and_keep, column, equals, load_tokenizer, make_templater)
from .readers import expand_sources
from .shards import TokenRows, write_shard
from .split import SPLIT_IDS, cross_split_overlap
from .units import UNIT_DONE_FILE, describe_units, missing_units, shard_name, unit_dir, unit_of, units_of_worker

LAYOUT = "one packed shard per hash unit"  # the manifest's packing_scope, and part of the cache key
SPLIT_DONE_FILE = "split.json"


def work_root(out_dir: Path) -> Path:
    """The distributed prep's work folder: a hidden sibling of data.output_dir (same filesystem)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.units"


def distributed_cache_key(cfg, tokenizer, tokenizer_path: str, revision: str | None) -> tuple[dict, str]:
    """(cache key parts, cache key) of a distributed prep: the single-process parts plus the layout."""
    parts = cache_key_parts(cfg, expand_sources(cfg.sources), tokenizer, tokenizer_path, revision)
    parts["layout"] = {"packing_scope": LAYOUT, "units": cfg.num_shards}
    return parts, _sha256_json(parts)


@one_tokenizer_thread()
def split_step(cfg, tokenizer_path: str, revision: str | None = None, force: bool = False) -> dict | None:
    """Step 1: clean, deduplicate, assign splits and units once; returns the split facts, or None when
    data.output_dir already holds this prep's output (nothing to do)."""
    out_dir = Path(cfg.output_dir)
    tokenizer = load_tokenizer(tokenizer_path, revision)
    key_parts, cache_key = distributed_cache_key(cfg, tokenizer, tokenizer_path, revision)
    existing = _complete_manifest(out_dir)
    if existing and existing.get("cache_key") == cache_key and not force:
        print(f"zerotune prep: {out_dir} is up to date (cache key {cache_key[:12]}); nothing to do. "
              f"Use --force to rebuild.")
        return None
    check_replaceable(out_dir)
    root = work_root(out_dir)
    facts = _read_json(root / "split" / SPLIT_DONE_FILE)
    if facts and facts["cache_key"] == cache_key and not force:
        print(f"zerotune prep: reusing the split in {root / 'split'}")
        return facts
    shutil.rmtree(root, ignore_errors=True)  # another input, settings or a forced rebuild: old units are stale
    root.mkdir(parents=True)
    tmp = Path(tempfile.mkdtemp(prefix="split.tmp-", dir=root))
    try:
        facts = _split_into(cfg, tokenizer, key_parts, cache_key, tmp)
        os.replace(tmp, root / "split")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return facts


def _split_into(cfg, tokenizer, key_parts: dict, cache_key: str, tmp: Path) -> dict:
    sources = expand_sources(cfg.sources)
    release = PageReleaser([tmp] + [src.path for src in sources if src.fmt == "arrow"])
    ds, kinds, split_ids, rows_read, drops, kept = clean_and_keep(
        cfg, sources, tmp / "_cache", cache_key[:16], resolve_num_proc(cfg.num_proc),
        lambda k: make_templater(cfg, tokenizer, k), release)
    units = unit_of(column(ds, "_hash", release)[kept], cfg.num_shards)
    # Saved unit after unit (stable: global order inside a unit), so a worker reads its units as contiguous
    # slices of the file instead of rows scattered over all of it.
    order = np.argsort(units, kind="stable")
    ds.select(kept[order]).save_to_disk(str(tmp / "docs"))
    np.save(tmp / "unit.npy", units[order])
    np.save(tmp / "split.npy", split_ids[kept][order])
    facts = {"cache_key": cache_key, "key_parts": key_parts, "num_units": cfg.num_shards, "kinds": kinds,
             "rows_read": rows_read, "drops": drops,
             "sources": _source_counts(ds, np.zeros(0, dtype=np.int32), sources, kinds, release)}
    del ds
    shutil.rmtree(tmp / "_cache", ignore_errors=True)
    (tmp / SPLIT_DONE_FILE).write_text(json.dumps(facts), encoding="utf-8")  # last: the split is complete
    return facts


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _load_split(out_dir: Path) -> dict:
    facts = _read_json(work_root(out_dir) / "split" / SPLIT_DONE_FILE)
    if facts is None:
        raise DataError(f"{work_root(out_dir) / 'split'} is missing or incomplete: the split step has not run "
                        f"for data.output_dir {out_dir}; run `zerotune prep CONFIG --step split` first (--srun "
                        f"and --slurm run every step)")
    return facts


@one_tokenizer_thread()
def units_step(cfg, tokenizer_path: str, worker: int = 0, workers: int = 1, revision: str | None = None) -> list[int]:
    """Step 2: run worker ``worker`` of ``workers``'s units that are not finished yet; returns the units run.

    A unit that fails raises a DataError naming the unit, its documents' sources and the cause (which names
    the row and the fix); units finished before it are kept.
    """
    import datasets

    root = work_root(Path(cfg.output_dir))
    facts = _load_split(Path(cfg.output_dir))
    num_units = facts["num_units"]
    unfinished = set(missing_units(root / "units", num_units))
    mine = [u for u in units_of_worker(worker, workers, num_units) if u in unfinished]
    if not mine:
        return []
    sources = expand_sources(cfg.sources)
    templater = make_templater(cfg, load_tokenizer(tokenizer_path, revision), facts["kinds"])
    docs = datasets.load_from_disk(str(root / "split" / "docs"))
    units, split_ids = np.load(root / "split" / "unit.npy"), np.load(root / "split" / "split.npy")
    (root / "units").mkdir(exist_ok=True)
    procs = resolve_num_proc(cfg.num_proc)  # this task's own CPUs (its affinity under srun)
    largest = max(int((units == u).sum()) for u in mine)
    print(f"zerotune prep: worker {worker} of {workers}: {describe(procs, largest, cfg.map_batch_size)}")
    for u in mine:
        rows = np.flatnonzero(units == u)
        unit_docs = docs.select(range(int(rows[0]), int(rows[-1]) + 1) if len(rows) else [])  # contiguous
        try:
            run_unit(cfg, unit_docs, split_ids[rows], templater, sources, root / "units", u,
                     facts["cache_key"][:16], procs.count)
        except DataError as exc:
            names = sorted({sources[s].path.name for s in np.unique(column(unit_docs, "_src")).tolist()})
            raise DataError(f"prep unit {u} of {num_units} ({len(rows)} documents from {', '.join(names)}) failed: "
                            f"{exc}. Units finished so far are kept: fix this and run the same prep again") from None
        print(f"zerotune prep: unit {u} of {num_units} done ({len(rows)} documents, worker {worker} of {workers})")
    return mine


def run_unit(cfg, docs, split_ids: np.ndarray, templater, sources, units_root: Path, unit: int,
             fingerprint: str, procs: int) -> None:
    """Template, tokenize and pack one unit's documents into one shard per split, in a temporary folder
    renamed to the unit's folder only when complete; the tokenize stage uses up to ``procs`` processes."""
    tmp = Path(tempfile.mkdtemp(prefix=f".unit-{unit:05d}.tmp-", dir=units_root))
    try:
        info = _pack_unit(cfg, docs, split_ids, templater, sources, tmp, unit, fingerprint,
                          PageReleaser([tmp, units_root.parent / "split"]), procs)
        shutil.rmtree(tmp / "_cache", ignore_errors=True)
        (tmp / UNIT_DONE_FILE).write_text(json.dumps(info), encoding="utf-8")
        os.replace(tmp, unit_dir(units_root, unit))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pack_unit(cfg, docs, split_ids, templater, sources, tmp: Path, unit: int, fingerprint: str, release,
               procs: int) -> dict:
    if not len(docs):  # more units than documents: datasets maps an empty table to one without columns
        return _empty_unit(tmp, unit)
    every = np.arange(len(docs))  # the split step kept only documents that survive its drops
    tok = _tokenize(cfg, docs, every, templater, sources, tmp / "_cache", f"{fingerprint}-{unit}", release, procs)
    col, eq = functools.partial(column, release=release), functools.partial(equals, release=release)
    final = eq(tok, "_drop2", "")
    lengths, truncated = col(tok, "n_tokens").astype(np.int64), col(tok, "truncated").astype(bool)
    splits = {}
    with TokenRows([Path(f["filename"]) for f in tok.cache_files]) as tokens:
        for name, sid in SPLIT_IDS.items():
            in_split = split_ids == sid
            doc_idx = np.flatnonzero(final & in_split)
            splits[name] = {"documents": int(len(doc_idx)), "tokens": int(lengths[doc_idx].sum()),
                            "truncated_documents": int(truncated[doc_idx].sum()),
                            **{r: int((eq(tok, "_drop2", r) & in_split).sum())
                               for r in ("too_long", "no_supervised_tokens")},
                            **_write_unit_shard(cfg, tokens, tmp, name, doc_idx, lengths, unit, release)}
    np.savez(tmp / "arrays.npz", raw_lengths=col(tok, "n_tokens_raw").astype(np.int64),
             phash=col(docs, "_phash").astype(np.int64), split=split_ids.astype(np.int8),
             pprefix=col(docs, "_pprefix").astype(np.int64),
             nhash=col(docs, "_nhash").astype(np.int64)[final], src=col(docs, "_src").astype(np.int64)[final])
    return {"unit": unit, "special_text_rows": int(col(tok, "special_text").astype(bool).sum()), "splits": splits}


def _empty_unit(tmp: Path, unit: int) -> dict:
    """A unit that received no document: zero counts, no shard, empty report arrays."""
    np.savez(tmp / "arrays.npz", **{k: np.zeros(0, dtype=np.int8 if k == "split" else np.int64)
                                    for k in ("raw_lengths", "phash", "split", "pprefix", "nhash", "src")})
    counts = dict.fromkeys(("documents", "tokens", "truncated_documents", "too_long", "no_supervised_tokens",
                            "sequences", "supervised_tokens"), 0)
    return {"unit": unit, "special_text_rows": 0, "splits": {name: {**counts, "shard": None} for name in SPLITS}}


def _write_unit_shard(cfg, tokens: TokenRows, tmp: Path, split: str, doc_idx: np.ndarray, lengths: np.ndarray, unit: int,
                      release) -> dict:
    """Pack one split of a unit (best-fit decreasing within the unit) and write it as the unit's shard."""
    packing = pack_best_fit(lengths[doc_idx], cfg.seq_len) if cfg.packing else no_packing(len(doc_idx))
    if not len(packing):
        return {"sequences": 0, "supervised_tokens": 0, "shard": None}
    local, docs_per_seq = packing.take(np.arange(len(packing)))
    rows = doc_idx[local]
    seq_tokens = np.add.reduceat(lengths[rows], np.cumsum(docs_per_seq) - docs_per_seq)
    shard = write_shard(tokens, tmp, split, shard_name(unit), rows, seq_tokens, release)
    return {"sequences": len(packing), "supervised_tokens": shard["supervised_tokens"], "shard": shard}


@one_tokenizer_thread()
def finish_step(cfg, tokenizer_path: str, revision: str | None = None) -> dict:
    """Step 3: when every unit is finished, write the output folder (shards, report, manifest last) and
    publish it; a DataError naming the unfinished units otherwise (no manifest is written)."""
    out_dir = Path(cfg.output_dir)
    root = work_root(out_dir)
    facts = _load_split(out_dir)
    num_units = facts["num_units"]
    missing = missing_units(root / "units", num_units)
    if missing:
        raise DataError(f"{len(missing)} of {num_units} prep units are not finished (unit {describe_units(missing)}; "
                        f"their worker failed or was killed), so {out_dir} was not written; run the same prep "
                        f"again (`zerotune prep CONFIG --srun` in an allocation, or --slurm): finished units are "
                        f"kept and only these run")
    infos = [json.loads((unit_dir(root / "units", u) / UNIT_DONE_FILE).read_text(encoding="utf-8"))
             for u in range(num_units)]
    splits = _merged_splits(cfg, facts, infos)
    if not splits["train"]["documents"]:
        raise _empty_data_error({k: s["rows_dropped"] for k, s in splits.items()}, facts["rows_read"])
    work = make_work_dir(out_dir)
    try:
        _link_shards(root / "units", work, infos)
        manifest, report = _write_outputs(cfg, facts, infos, splits, root / "units", work, (tokenizer_path, revision))
        publish(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(root, ignore_errors=True)
    report_mod.print_summary(manifest, report, out_dir)
    return manifest


def _merged_splits(cfg, facts: dict, infos: list[dict]) -> dict:
    """The manifest's per-split entries: the split step's row counts plus every unit's counts and shards."""
    splits = {}
    for name in SPLITS:
        per = [info["splits"][name] for info in infos]
        total = {k: sum(p[k] for p in per) for k in ("documents", "tokens", "supervised_tokens", "sequences",
                                                     "truncated_documents", "too_long", "no_supervised_tokens")}
        drops = {**facts["drops"][name], "too_long": total["too_long"],
                 "no_supervised_tokens": total["no_supervised_tokens"]}
        splits[name] = {"rows_read": facts["rows_read"][name], "rows_dropped": drops,
                        "truncated_documents": total["truncated_documents"], "documents": total["documents"],
                        "tokens": total["tokens"], "supervised_tokens": total["supervised_tokens"],
                        "sequences": total["sequences"],
                        "packing_efficiency": round(packing_efficiency(total["tokens"], total["sequences"],
                                                                       cfg.seq_len), 6),
                        "shards": [p["shard"] for p in per if p["shard"]]}
    return splits


def _link_shards(units_root: Path, work: Path, infos: list[dict]) -> None:
    """Every unit's shard files into the output folder: hard links (no bytes copied), copies across filesystems."""
    for info in infos:
        for split, entry in info["splits"].items():
            if not entry["shard"]:
                continue
            src = shard_files(unit_dir(units_root, info["unit"]), split, entry["shard"]["name"])
            dst = shard_files(work, split, entry["shard"]["name"])
            dst["input_ids"].parent.mkdir(parents=True, exist_ok=True)
            for name, path in src.items():
                try:
                    os.link(path, dst[name])
                except OSError:
                    shutil.copyfile(path, dst[name])


def _write_outputs(cfg, facts: dict, infos: list[dict], splits: dict, units_root: Path, work: Path,
                   model_ref: tuple) -> tuple[dict, dict]:
    """report.json, lengths.png and manifest.json (last) in ``work``; the cross-unit report arrays are
    concatenated from the units' own arrays here."""
    arrays = [np.load(unit_dir(units_root, info["unit"]) / "arrays.npz") for info in infos]
    cat = lambda key: np.concatenate([a[key] for a in arrays])  # noqa: E731
    sources, kinds = expand_sources(cfg.sources), facts["kinds"]
    kind = kinds[0] if len(set(kinds)) == 1 else "mixed"
    manifest = _manifest(cfg, facts["key_parts"], facts["cache_key"], splits, kind, sources, kinds)
    manifest["packing_scope"] = LAYOUT
    documents = np.bincount(cat("src"), minlength=len(sources))
    source_counts = [{**s, "documents": int(documents[i])} for i, s in enumerate(facts["sources"])]
    report_facts = report_mod.Facts(
        kind=kind, seq_len=cfg.seq_len, raw_lengths=cat("raw_lengths"),
        overlap=cross_split_overlap(cat("phash"), cat("split")), prefix_hashes=cat("pprefix"),
        params=report_mod.count_params(*model_ref), near_hashes=cat("nhash"), cleaning_steps=cleaning_steps(cfg),
        special_text_rows=sum(info["special_text_rows"] for info in infos), sources=source_counts)
    report = report_mod.build_report(manifest, report_facts)
    (work / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    report_mod.plot_lengths(report_facts.raw_lengths, cfg.seq_len, work / "lengths.png")
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest, report


def prepare_distributed(cfg, tokenizer_path: str, revision: str | None = None, force: bool = False,
                        worker: int = 0, workers: int = 1) -> dict | None:
    """All three steps in this process (worker ``worker`` of ``workers`` in the middle one): the reference
    the multi-worker runs are compared with, and the way to finish a run whose workers ran elsewhere."""
    if split_step(cfg, tokenizer_path, revision, force) is None:
        return _complete_manifest(Path(cfg.output_dir))
    units_step(cfg, tokenizer_path, worker, workers, revision)
    return finish_step(cfg, tokenizer_path, revision)
