"""`zerotune prep`: raw files -> clean -> template + tokenize -> split -> pack -> shards + manifest + report.

:func:`prepare` is the whole pipeline. It first computes the cache key (input bytes, tokenizer, template,
settings); when the folder at data.output_dir already holds a manifest with that key it does nothing.
Otherwise it builds everything in a temporary sibling folder and renames it into place only when complete.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import report as report_mod
from .clean import BAD_ROW_EXAMPLES, Normalizer, clean_batch, clean_features, cleaning_steps, first_occurrences
from .errors import DataError
from .format import FORMAT_NAME, FORMAT_VERSION, SPLITS, sha256_files, tokenizer_hash
from .outdir import make_work_dir, publish
from .pages import PageReleaser, Releasing
from .procs import Procs, describe, one_tokenizer_thread, resolve_num_proc, stage_procs
from .pack import assign_to_shards, no_packing, pack_best_fit, packing_efficiency
from .readers import Source, expand_sources, read_source, resolve_columns, row_label, source_settings
from .records import EXPECTED_SHAPE
from .shards import TokenRows, write_shard
from .split import SPLIT_IDS, assign_splits, cross_split_overlap
from .template import Templater, resolve_chat_template, token_features, token_table, tokenize_kept

# Bump when a change here changes the output for the same inputs, so old caches are rebuilt.
PIPELINE_VERSION = 5
DROP_REASONS = ("bad_row", "empty_field", "duplicate", "too_long", "no_supervised_tokens")
READ_BATCH_ROWS = 100_000  # rows per Arrow batch of a column read
# Settings that change how fast prep runs but never what it writes: left out of the cache key.
NON_OUTPUT_SETTINGS = ("output_dir", "num_proc", "map_batch_size")


@one_tokenizer_thread()
def prepare(cfg, tokenizer_path: str, force: bool = False, revision: str | None = None) -> dict:
    """Prepare ``cfg.sources`` (a DataConfig) into shards under ``cfg.output_dir``; returns the manifest.

    ``revision`` (model.revision) pins a hub model's tokenizer to a branch, tag or commit. The map stages
    use data.num_proc processes of one tokenizer thread each (procs.py).
    """
    out_dir = Path(cfg.output_dir)
    tokenizer = load_tokenizer(tokenizer_path, revision)
    sources = expand_sources(cfg.sources)
    key_parts = cache_key_parts(cfg, sources, tokenizer, tokenizer_path, revision)
    cache_key = _sha256_json(key_parts)
    existing = _complete_manifest(out_dir)
    if existing and existing.get("cache_key") == cache_key and not force:
        print(f"zerotune prep: {out_dir} is up to date (cache key {cache_key[:12]}: same inputs, tokenizer, "
              f"template and settings); nothing to do. Use --force to rebuild.")
        return existing
    work = make_work_dir(out_dir)
    try:
        manifest, report = _build(cfg, tokenizer, (tokenizer_path, revision), sources, key_parts, cache_key, work)
        shutil.rmtree(work / "_cache", ignore_errors=True)
        publish(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    report_mod.print_summary(manifest, report, out_dir)
    return manifest


def load_tokenizer(path: str, revision: str | None = None):
    """The fast tokenizer of model.name_or_path (a DataError when it cannot be loaded or is not fast)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's path or files
        raise DataError(f"model.name_or_path {path!r}: cannot load its tokenizer ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); point it at a model folder or hub name "
                        f"with tokenizer files") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"model.name_or_path {path!r}: its tokenizer is not a fast (Rust) tokenizer, which prep "
                        f"needs for batched offsets; provide tokenizer.json")
    return tok


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def cache_key_parts(cfg, sources: list[Source], tokenizer, tokenizer_path: str, revision: str | None = None) -> dict:
    """Everything the output depends on: input bytes, tokenizer, template and prep settings."""
    inputs = [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_files([p])}
              for src in sources for p in src.files()]
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NON_OUTPUT_SETTINGS}
    chat_template = resolve_chat_template(tokenizer, cfg.chat_template)[0] if cfg.chat_template else \
        tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else \
        json.dumps(tokenizer.chat_template, sort_keys=True)
    return {
        "pipeline_version": PIPELINE_VERSION, "format_version": FORMAT_VERSION, "inputs": inputs,
        "tokenizer": {"name_or_path": str(tokenizer_path), "revision": revision, "vocab_size": len(tokenizer),
                      "hash": tokenizer_hash(tokenizer),
                      "backend_sha256": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()},
        "template": {"kind": cfg.template, "format_string": cfg.format_string, "train_on_prompt": cfg.train_on_prompt,
                     "system_prompt": cfg.system_prompt,
                     "chat_template": cfg.chat_template,
                     "chat_template_hash": hashlib.sha256((chat_template or "").encode()).hexdigest()},
        "settings": settings,
    }


def _complete_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


class RowLocator:
    """Names a row of a source for error messages (picklable, for datasets' worker processes)."""

    def __init__(self, sources: list[Source]):
        self.sources = sources

    def __call__(self, src_id: int, row: int) -> str:
        return row_label(self.sources[src_id], row)


def _map_kwargs(cfg, cache: Path, stage: str, fingerprint: str, procs: int, rows: int) -> dict:
    # Explicit cache files keep datasets from writing next to the inputs (save_to_disk folders).
    return {"batched": True, "batch_size": cfg.map_batch_size, "num_proc": stage_procs(procs, rows, cfg.map_batch_size),
            "cache_file_name": str(cache / f"{stage}.arrow"), "new_fingerprint": f"{stage}-{fingerprint}"}


def read_and_clean(cfg, sources: list[Source], cache: Path, fingerprint: str, procs: Procs, on_kinds=None,
                   release: PageReleaser | None = None):
    """Read every source and clean it into canonical records; returns (dataset, record type per source).

    ``on_kinds(kinds)`` is called once every source's record type is known, before any row is cleaned, so
    checks that need only the settings (template, seq_len) fail before the long stages. ``release()`` is
    called after every batch (a PageReleaser keeps the mapped pages read from growing with the data).
    Prints the processes the map stages use (the tokenize stage's, over every row read).
    """
    import datasets

    raws, columns = [], []
    for src in sources:
        raw = read_source(src, cache / "read")
        raws.append(raw)
        columns.append(resolve_columns(raw, source_settings(cfg, src.entry), src))
    if on_kinds:
        on_kinds([c.kind for c in columns])
    print(f"zerotune prep: {describe(procs, sum(map(len, raws)), cfg.map_batch_size)}")
    normalize = Normalizer(cleaning_steps(cfg))
    clean = Releasing(clean_batch, release or PageReleaser([]))
    cleaned = []
    for src_id, (src, raw, cols) in enumerate(zip(sources, raws, columns)):
        ds = raw.map(clean, with_indices=True, remove_columns=raw.column_names, features=clean_features(),
                     fn_kwargs={"columns": cols, "src": src, "src_id": src_id, "normalize": normalize},
                     desc=f"clean {src.path.name}",
                     **_map_kwargs(cfg, cache, f"clean-{src_id}", fingerprint, procs.count, len(raw)))
        if equals(ds, "_drop", "bad_row", clean.release).all():
            first = ds.select([0])[0]
            raise DataError(f"{src.path}: every row is unusable as {cols.kind} records (first: "
                            f"{row_label(src, first['_row'])}: {first['_why']}); expected "
                            f"{EXPECTED_SHAPE[cols.kind]}; set record_type and the column names for this source "
                            f"(data.sources[{src.entry}]) or fix the file")
        cleaned.append(ds)
    ds = cleaned[0] if len(cleaned) == 1 else datasets.concatenate_datasets(cleaned)
    return ds, [c.kind for c in columns]


def equals(ds, name: str, value: str, release=lambda: None, rows: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of rows whose string column ``name`` equals ``value`` (no Python string per row); only
    of ``rows`` (sorted row indices) when given."""
    import pyarrow.compute as pc

    return _read_column(ds, name, lambda col: pc.equal(col, value).to_numpy(zero_copy_only=False), release, rows) \
        .astype(bool)


def column(ds, name: str, release=lambda: None, rows: np.ndarray | None = None) -> np.ndarray:
    """One column as a numpy array, read in Arrow batches (respects a selection; no Python objects); only
    the values of ``rows`` (sorted row indices) when given."""
    return _read_column(ds, name, lambda col: col.to_numpy(zero_copy_only=False), release, rows)


def _read_column(ds, name: str, convert, release, rows) -> np.ndarray:
    # Each part is copied out of the mapping before ``release()``: a column's values sit between the other
    # columns' buffers of their record batch, and the kernel maps up to 64 KiB around every page read, so
    # reading one int column of 1M rows mapped ~64 MB unless released as it goes. Parts go straight into
    # the result (a list of parts and their concatenation held the column twice), and only the rows asked
    # for are kept (no full column beside its [rows] copy).
    out, first, filled = None, 0, 0
    for batch in ds.select_columns([name]).with_format("arrow").iter(batch_size=READ_BATCH_ROWS):
        values = np.asarray(convert(batch.column(name)))
        end = first + len(values)
        if rows is not None:
            lo, hi = np.searchsorted(rows, (first, end))
            values = values[rows[lo:hi] - first]
        if out is None:
            out = np.empty(len(ds) if rows is None else len(rows), dtype=values.dtype)
        out[filled:filled + len(values)] = values
        filled, first = filled + len(values), end
        del batch, values
        release()
    return out if out is not None else np.array([])


def row_index_dtype(n_rows: int):
    """The smallest signed integer type that indexes ``n_rows`` rows (int32 below 2**31 rows)."""
    return np.int32 if n_rows < 2**31 else np.int64


def _count_by_split(split_ids: np.ndarray, mask: np.ndarray) -> dict[str, int]:
    return {name: int(((split_ids == sid) & mask).sum()) for name, sid in SPLIT_IDS.items()}


def _empty_data_error(drops: dict, rows_read: dict) -> DataError:
    lines = ", ".join(f"{reason} {sum(d[reason] for d in drops.values())}" for reason in DROP_REASONS)
    return DataError(f"no training rows left after cleaning: {sum(rows_read.values())} rows read, dropped: {lines}; "
                     f"check the column settings (data.*_column), data.seq_len and data.excess_length, "
                     f"and that data.validation_fraction + data.test_fraction leave rows for training")


def _drop_clean_rows(ds, split_ids: np.ndarray, drops: dict, release) -> np.ndarray:
    """Row indices that survive empty-field and duplicate drops (counted into ``drops`` per split)."""
    bad, empty = equals(ds, "_drop", "bad_row", release), equals(ds, "_drop", "empty_field", release)
    usable = ~empty & ~bad
    # Only the usable rows' hashes are read (the whole column is not held beside them while dedup sorts).
    rows = np.flatnonzero(usable).astype(row_index_dtype(len(usable)))
    first = first_occurrences(column(ds, "_hash", release, rows))
    del rows
    duplicate = np.zeros(len(usable), dtype=bool)
    duplicate[usable] = ~first
    for reason, mask in (("bad_row", bad), ("empty_field", empty), ("duplicate", duplicate)):
        for name, n in _count_by_split(split_ids, mask).items():
            drops[name][reason] = n
    usable &= ~duplicate
    return np.flatnonzero(usable).astype(row_index_dtype(len(usable)))


class Kept(NamedTuple):
    """The cleaned rows and what the first stages decided about them (:func:`clean_and_keep`)."""

    ds: object  # every cleaned row, in source order
    kinds: list[str]  # record type per source
    split_ids: np.ndarray  # split per row of ``ds``
    rows_read: dict  # rows per split
    drops: dict  # per split, rows dropped per reason so far
    kept: np.ndarray  # rows of ``ds`` that survive the bad-row, empty-field and duplicate drops (ascending)


def clean_and_keep(cfg, sources: list[Source], cache: Path, fingerprint: str, procs: Procs, on_kinds,
                   release) -> Kept:
    """Read and clean every source, give each row its split and drop bad, empty and duplicate rows: the
    stages the single-process and the distributed prep share. A DataError when no row is left."""
    ds, kinds = read_and_clean(cfg, sources, cache, fingerprint, procs, on_kinds=on_kinds, release=release)
    split_ids = assign_splits(column(ds, "_hash", release), cfg.validation_fraction, cfg.test_fraction)
    rows_read = _count_by_split(split_ids, np.ones(len(split_ids), dtype=bool))
    drops = {name: dict.fromkeys(DROP_REASONS, 0) for name in SPLITS}
    kept = _drop_clean_rows(ds, split_ids, drops, release)
    if not len(kept):
        raise _empty_data_error(drops, rows_read)
    release()
    return Kept(ds, kinds, split_ids, rows_read, drops, kept)


def make_templater(cfg, tokenizer, kinds: list[str]) -> Templater:
    """The templater for sources of ``kinds``; a DataError when the template cannot work (no chat template,
    seq_len too small)."""
    templater = Templater(tokenizer, cfg, set(kinds))
    overhead = templater.overhead_tokens(set(kinds))
    if overhead >= cfg.seq_len:
        raise DataError(f"data.seq_len {cfg.seq_len} is too small: the template's own tokens (and EOS) take "
                        f"{overhead}, leaving no room for data; raise data.seq_len well above {overhead}")
    return templater


def _tokenize(cfg, ds, kept: np.ndarray, templater: Templater, sources, cache: Path, fingerprint: str, release,
              procs: int):
    # Every row of ``ds`` in order, those not kept skipped inside the batch: reading the kept rows through
    # ds.select(kept) gathered them one table slice at a time (a tenth of prep's CPU time).
    keep = np.zeros(len(ds), dtype=bool)
    keep[kept] = True
    records = ds.select_columns(["messages", "tools", "text", "_src", "_row"])
    return records.map(Releasing(_tokenize_rows, release), with_indices=True, remove_columns=records.column_names,
                       features=token_features(),
                       fn_kwargs={"keep": keep, "templater": templater, "seq_len": cfg.seq_len,
                                  "excess_length": cfg.excess_length, "where": RowLocator(sources)},
                       desc="template + tokenize",
                       **_map_kwargs(cfg, cache, "tokenize", fingerprint, procs, len(records)))


def _tokenize_rows(batch: dict, indices: list[int], **kwargs):
    return token_table(tokenize_kept(batch, indices, **kwargs))


def _write_split(cfg, tok: TokenRows, work: Path, split: str, rows: np.ndarray, lengths: np.ndarray,
                 release) -> dict:
    """Pack one split's documents (``rows`` of the tokenized dataset, ``lengths`` tokens each) and write
    its shards; returns the split's counts and shard entries."""
    from tqdm.auto import tqdm

    packing = pack_best_fit(lengths, cfg.seq_len, desc=f"pack {split}") if cfg.packing else no_packing(len(rows))
    shards = []
    for s, members in enumerate(tqdm(assign_to_shards(len(packing), cfg.num_shards), desc=f"write {split}",
                                     unit="shard", leave=False)):
        local, docs_per_seq = packing.take(members)
        seq_tokens = np.add.reduceat(lengths[local], np.cumsum(docs_per_seq) - docs_per_seq)
        # rows of the tokenized dataset, sequence by sequence
        shards.append(write_shard(tok, work, split, f"shard-{s:05d}", rows[local], seq_tokens, release))
    tokens = int(lengths.sum())
    return {"documents": int(len(rows)), "tokens": tokens,
            "supervised_tokens": sum(s["supervised_tokens"] for s in shards), "sequences": len(packing),
            "packing_efficiency": round(packing_efficiency(tokens, len(packing), cfg.seq_len), 6), "shards": shards}


def _build(cfg, tokenizer, model_ref: tuple, sources, key_parts, cache_key, work: Path) -> tuple[dict, dict]:
    cache = work / "_cache"
    release = PageReleaser([work] + [src.path for src in sources if src.fmt == "arrow"])
    templaters: list[Templater] = []
    procs = resolve_num_proc(cfg.num_proc)
    ds, kinds, split_ids, rows_read, drops, kept = clean_and_keep(
        cfg, sources, cache, cache_key[:16], procs, lambda k: templaters.append(make_templater(cfg, tokenizer, k)),
        release)
    # Per-row arrays are read for the kept rows only (int32 row indices below 2**31 rows): they are what
    # grows with the data while the stages stream.
    col = functools.partial(column, release=release, rows=kept)
    eq = functools.partial(equals, release=release, rows=kept)
    # row for row with ds
    tok = _tokenize(cfg, ds, kept, templaters[0], sources, cache, cache_key[:16], release, procs.count)
    split_kept = split_ids[kept]
    del split_ids
    for r in ("too_long", "no_supervised_tokens"):
        for name, n in _count_by_split(split_kept, eq(tok, "_drop2", r)).items():
            drops[name][r] = n
    final = eq(tok, "_drop2", "")
    if not _count_by_split(split_kept, final)["train"]:
        raise _empty_data_error(drops, rows_read)
    lengths, truncated = col(tok, "n_tokens"), col(tok, "truncated")
    splits = {}
    with TokenRows([Path(f["filename"]) for f in tok.cache_files]) as tokens:
        for name, sid in SPLIT_IDS.items():
            docs = final & (split_kept == sid)  # a mask over kept, not an int64 index per document
            release()
            info = _write_split(cfg, tokens, work, name, kept[docs], lengths[docs], release)
            splits[name] = {"rows_read": rows_read[name], "rows_dropped": drops[name],
                            "truncated_documents": int(truncated[docs].sum()), **info}
    del lengths, truncated
    release.release()  # the report and its plot are the last peak: start them from a trimmed heap
    kind = kinds[0] if len(set(kinds)) == 1 else "mixed"
    manifest = _manifest(cfg, key_parts, cache_key, splits, kind, sources, kinds)
    final_rows = kept[final]
    facts = report_mod.Facts(
        kind=kind, seq_len=cfg.seq_len, raw_lengths=col(tok, "n_tokens_raw"),
        overlap=cross_split_overlap(col(ds, "_phash"), split_kept),
        prefix_hashes=col(ds, "_pprefix"), params=report_mod.count_params(*model_ref),
        near_hashes=column(ds, "_nhash", release, final_rows), cleaning_steps=cleaning_steps(cfg),
        special_text_rows=int(col(tok, "special_text").sum()),
        sources=_source_counts(ds, column(ds, "_src", release, final_rows), sources, kinds, release))
    del col, eq, kept, final, final_rows, split_kept  # the report holds only its own arrays
    report = report_mod.build_report(manifest, facts)
    (work / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    raw_lengths = facts.raw_lengths
    del facts  # the hash arrays are done with; the plot, the run's last peak, needs the lengths only
    release.release()  # and hand their pages (kept by the heap once freed) back before it
    report_mod.plot_lengths(raw_lengths, cfg.seq_len, work / "lengths.png")
    # The manifest goes last: a folder is complete only when it has one.
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest, report


def _source_counts(ds, final_src: np.ndarray, sources: list[Source], kinds: list[str], release) -> list[dict]:
    """Per source: its record type, rows read, documents kept, and its bad rows by reason with the first
    few named by file and line."""
    src_all, bad = column(ds, "_src", release), equals(ds, "_drop", "bad_row", release)
    bad_rows = ds.select(np.flatnonzero(bad)).select_columns(["_src", "_row", "_why"]).to_list() if bad.any() else []
    out = []
    for src_id, (src, kind) in enumerate(zip(sources, kinds)):
        mine = [r for r in bad_rows if r["_src"] == src_id]
        reasons: dict[str, int] = {}
        for r in mine:
            reason = r["_why"].split(":", 1)[0]
            reasons[reason] = reasons.get(reason, 0) + 1
        out.append({"path": str(src.path), "record_type": kind, "rows_read": int((src_all == src_id).sum()),
                    "documents": int((final_src == src_id).sum()), "bad_rows": len(mine),
                    "bad_rows_by_reason": dict(sorted(reasons.items())),
                    "first_bad_rows": [f"{row_label(src, r['_row'])}: {r['_why']}" for r in mine[:BAD_ROW_EXAMPLES]]})
    return out


def _manifest(cfg, key_parts: dict, cache_key: str, splits: dict, kind: str, sources: list[Source],
              kinds: list[str]) -> dict:
    tokens = sum(s["tokens"] for s in splits.values())
    sequences = sum(s["sequences"] for s in splits.values())
    template = {k: key_parts["template"][k] for k in ("format_string", "train_on_prompt", "chat_template",
                                                      "chat_template_hash")}
    template["kind"] = "text" if kind == "text" else cfg.template
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "cache_key": cache_key,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seq_len": cfg.seq_len, "packing": cfg.packing,
        "packing_efficiency": round(packing_efficiency(tokens, sequences, cfg.seq_len), 6),
        "record_type": kind,
        "sources": [{"path": str(src.path), "record_type": k} for src, k in zip(sources, kinds)],
        "tokenizer": {k: key_parts["tokenizer"][k] for k in ("name_or_path", "revision", "vocab_size", "hash")},
        "template": template, "settings": dataclasses.asdict(cfg), "inputs": key_parts["inputs"], "splits": splits,
    }
