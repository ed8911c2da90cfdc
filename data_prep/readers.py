"""Reading data.sources (CSV, JSONL, Parquet, `save_to_disk` folders) into Arrow-backed datasets.

Every file becomes memory-mapped Arrow, so later stages stream over rows instead of holding them. JSON and
Parquet go through the `datasets` library; CSV is read here in batches of :data:`CSV_BATCH_ROWS` rows
(:func:`read_csv_streaming`), with the same pandas parser and settings `datasets.Dataset.from_csv` uses,
each batch appended to an Arrow file and its memory handed back before the next: `from_csv` held
allocator memory that grew with the file (+110 MiB at 3000x the bundled sample). When a file fails to
parse, :func:`diagnose` re-reads it line by line to name the exact line (the parsers' own messages often
point at the wrong place).
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .config import SourceConfig
from .errors import DataError
from .pages import release_free_heap
from .records import Columns

FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
CSV_BATCH_ROWS = 5_000  # rows parsed per batch: bounds the reader's memory (a few MB of text per batch)


@dataclass(frozen=True)
class Source:
    """One input: a file (csv/json/parquet) or a folder written by ``datasets.save_to_disk`` (arrow)."""

    path: Path
    fmt: str
    entry: int = 0  # index of its data.sources entry (a folder entry yields several sources)

    def files(self) -> list[Path]:
        """Every file whose bytes make up this source (for content hashing)."""
        if self.path.is_dir():
            return sorted(p for p in self.path.rglob("*") if p.is_file())
        return [self.path]


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file() or \
        (folder / "state.json").is_file()


def expand_sources(sources: list) -> list[Source]:
    """Resolve data.sources into files/folders with a known format; folders of plain files are expanded."""
    if not sources:
        raise DataError("data.sources is empty: list CSV, JSONL or Parquet files, or save_to_disk folders")
    out: list[Source] = []
    for i, entry in enumerate(sources):
        raw = entry.path if isinstance(entry, SourceConfig) else str(entry)
        path = Path(raw)
        if not raw or not path.exists():
            raise DataError(f"data.sources[{i}]: {raw or '(no path)'} does not exist; fix the path (relative paths "
                            f"are read from the current directory, {Path.cwd()})")
        if path.is_dir() and _is_saved_dataset(path):
            out.append(Source(path, "arrow", i))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in FORMATS)
            if not found:
                raise DataError(f"data.sources[{i}]: folder {raw} holds no .csv/.jsonl/.json/.parquet file and "
                                f"is not a datasets.save_to_disk folder")
            out.extend(Source(p, FORMATS[p.suffix.lower()], i) for p in found)
        elif path.suffix.lower() in FORMATS:
            out.append(Source(path, FORMATS[path.suffix.lower()], i))
        else:
            raise DataError(f"data.sources[{i}]: {raw} has an unknown extension {path.suffix!r}; use one of "
                            f"{', '.join(FORMATS)} or a datasets.save_to_disk folder")
    return out


def read_source(src: Source, cache_dir: Path):
    """Load one source as a ``datasets.Dataset`` (Arrow, memory-mapped); raise DataError naming the bad line.

    Always in this process: `datasets` splits a read over processes by input file, never within one, and
    a source here is one file (it set any num_proc back to 1, after a warning).
    """
    import datasets

    if src.fmt != "arrow" and src.path.stat().st_size == 0:
        raise DataError(f"{src.path}: the file is empty; remove it from data.sources or fill it")
    if src.fmt in ("csv", "json") and not _is_utf8(src.path):
        # pyarrow's JSON reader lets bad bytes through to fail later without a location: check up front.
        raise DataError(f"{src.path}: {_first_bad_utf8(src.path)}")
    ds_logger = logging.getLogger("datasets")
    level = ds_logger.level
    ds_logger.setLevel(logging.CRITICAL)  # its own "Failed to read" traceback would bury our one line
    try:
        if src.fmt == "arrow":
            ds = datasets.load_from_disk(str(src.path))
            if isinstance(ds, datasets.DatasetDict):
                ds = datasets.concatenate_datasets([ds[k] for k in sorted(ds)])
        elif src.fmt == "csv":
            ds = read_csv_streaming(src.path, cache_dir)
        else:
            reader = {"json": datasets.Dataset.from_json, "parquet": datasets.Dataset.from_parquet}[src.fmt]
            ds = reader(str(src.path), cache_dir=str(cache_dir))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - every parser failure becomes one message naming the line
        cause = exc.__cause__ or exc
        where = diagnose(src) or f"could not be read ({type(cause).__name__}: {cause})"
        raise DataError(f"{src.path}: {where}") from None
    finally:
        ds_logger.setLevel(level)
    if len(ds) == 0:
        raise DataError(f"{src.path}: no data rows (only a header, or nothing but blank lines); fill it or "
                        f"remove it from data.sources")
    return ds


def read_csv_streaming(path: Path, cache_dir: Path):
    """A CSV file as a memory-mapped ``datasets.Dataset``, parsed in batches of CSV_BATCH_ROWS rows.

    The parser and its settings are those of ``datasets.Dataset.from_csv`` (pandas' C parser, blank lines
    skipped, pandas' missing-value words read as null), so the rows are the same; every column is text, so
    a numeric-looking answer ("42") stays text, and a UTF-8 BOM is not part of the first name. Each batch is
    appended to an Arrow file and the allocators' free memory is handed back after it, so memory holds one
    batch whatever the file's size.
    """
    import datasets
    import pandas as pd
    import pyarrow as pa

    header = _csv_header(path)
    schema = pa.schema([(name, pa.string()) for name in header]) if header else None
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrow_path = cache_dir / f"csv-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}.arrow"
    batches = pd.read_csv(path, chunksize=CSV_BATCH_ROWS, encoding="utf-8-sig",
                          dtype=dict.fromkeys(header, object) if header else None)
    writer = None
    with pa.OSFile(str(arrow_path), "wb") as sink:
        for frame in batches:
            table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False).replace_schema_metadata()
            schema = table.schema
            writer = writer or pa.ipc.new_stream(sink, schema)
            writer.write_table(table)
            del frame, table
            release_free_heap()
        if writer is None:  # nothing but a header: an empty table with the header's columns
            writer = pa.ipc.new_stream(sink, schema or pa.schema([]))
        writer.close()
    return datasets.Dataset.from_file(str(arrow_path))


def _csv_header(path: Path) -> list[str]:
    """The column names of a CSV's first line (the csv module's reading; [] when it is blank)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return next(csv.reader(fh), [])


def diagnose(src: Source) -> str | None:
    """Find the first problem in a text file that failed to parse: bad UTF-8, a bad JSON line, a bad CSV row."""
    if src.fmt not in ("csv", "json"):
        return None
    problem = _first_bad_utf8(src.path)
    if problem:
        return problem
    return _first_bad_csv_row(src.path) if src.fmt == "csv" else _first_bad_json_line(src.path)


def _is_utf8(path: Path) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _first_bad_utf8(path: Path) -> str | None:
    offset_bytes = 0
    with open(path, "rb") as fh:
        for line_no, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (f"line {line_no}: bytes that are not UTF-8 (byte offset {offset_bytes + exc.start} in the "
                        f"file, {line[exc.start:exc.start + 4]!r}); re-save the file as UTF-8 (e.g. "
                        f"`iconv -f latin1 -t utf-8`)")
            offset_bytes += len(line)
    return None


def _first_bad_csv_row(path: Path) -> str | None:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, strict=True)
        last_good_line, data_rows = 0, 0
        try:
            header = next(reader, [])
            last_good_line = reader.line_num
            for row in reader:
                if len(row) > len(header):
                    return (f"line {reader.line_num}: {len(row)} fields but the header has {len(header)}; "
                            f"quote fields that contain commas (\"a, b\") and double quotes inside them (\"\")")
                last_good_line, data_rows = reader.line_num, data_rows + 1
        except csv.Error as exc:
            return (f"line {last_good_line + 1}: malformed CSV ({exc}), e.g. a quote that is never closed; "
                    f"close the quote or double the quote characters inside the field")
    if not data_rows:
        return "no data rows (only a header, or nothing but blank lines); fill it or remove it from data.sources"
    return None


def _first_bad_json_line(path: Path) -> str | None:
    with open(path, encoding="utf-8") as fh:
        first = fh.read(1)
    if first == "[":
        return None  # a JSON array file, not JSON Lines: its parser's own message is all we have
    objects = 0
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                return (f"line {line_no}: invalid JSON ({exc.msg} at column {exc.colno}); each line must be one "
                        f"complete JSON object")
            if not isinstance(value, dict):
                return f"line {line_no}: a JSON {type(value).__name__}, expected one object per line"
            objects += 1
    return None if objects else "no data rows (nothing but blank lines); fill it or remove it from data.sources"


# For each record type: its columns as (canonical name, config key, required).
_COLUMNS = {
    "messages": [("messages", "messages_column", True), ("tools", "tools_column", False)],
    "sharegpt": [("messages", "conversations_column", True), ("tools", "tools_column", False)],
    "alpaca": [("instruction", "instruction_column", True), ("output", "output_column", True),
               ("input", "input_column", False)],
    "prompt_response": [("prompt", "prompt_column", True), ("response", "response_column", True)],
    "text": [("text", "text_column", True)],
}


def source_settings(cfg, entry: int) -> SourceConfig:
    """data.sources[entry] with every unset field taken from the data section (one source's settings)."""
    given = cfg.sources[entry]
    given = given if isinstance(given, SourceConfig) else SourceConfig(path=str(given))
    merged = {f.name: getattr(given, f.name) for f in dataclasses.fields(SourceConfig)}
    for name, value in merged.items():
        if value is None:
            merged[name] = getattr(cfg, name)
    return SourceConfig(**merged)


def _turn_keys(ds, column: str) -> set:
    """The keys of the first turn of the first non-empty conversation in ``column`` (auto detection)."""
    for value in ds.select(range(min(len(ds), 100)))[column]:
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return {k for k, v in value[0].items() if v is not None}
    return set()


def _auto_kind(ds, opts: SourceConfig) -> tuple[str, str | None] | None:
    """(record type, the conversation column when one was found) for record_type auto, or None."""
    columns = ds.column_names
    for column in (opts.messages_column, opts.conversations_column):
        if column in columns:
            return ("sharegpt" if "from" in _turn_keys(ds, column) else "messages"), column
    for kind in ("alpaca", "prompt_response", "text"):
        if all(getattr(opts, key) in columns for _, key, required in _COLUMNS[kind] if required):
            return kind, None
    return None


def resolve_columns(ds, opts: SourceConfig, src: Source) -> Columns:
    """The record type and column names of one source: the configured type (its columns must exist) or,
    for auto, one inferred from the columns present and the first conversation's keys."""
    columns, kind, found = ds.column_names, opts.record_type, None
    if kind == "auto":
        kind, found = _auto_kind(ds, opts) or _raise_auto_failed(columns, opts, src)
    names = {}
    for name, key, required in _COLUMNS[kind]:
        column = found if found and name == "messages" else getattr(opts, key)
        if column in columns:
            names[name] = (f"data.{key}", column)
        elif required:
            raise DataError(f"{src.path}: column {column!r} (data.{key}, record_type {kind}) not found; "
                            f"columns found: {', '.join(columns)}; set data.{key} (or {key} in "
                            f"data.sources[{src.entry}]) to one of them")
    return Columns(kind=kind, names=names, roles=dict(opts.sharegpt_roles))


def _raise_auto_failed(columns, opts, src) -> str:
    raise DataError(f"{src.path}: data.record_type auto found none of: a {opts.messages_column!r} or "
                    f"{opts.conversations_column!r} column (data.messages_column, data.conversations_column), "
                    f"{opts.instruction_column!r} + {opts.output_column!r} (alpaca), {opts.prompt_column!r} + "
                    f"{opts.response_column!r} (data.prompt_column, data.response_column), or "
                    f"{opts.text_column!r} (data.text_column); columns found: {', '.join(columns)}; set those keys "
                    f"to your column names, or record_type and the columns in this source's data.sources entry")


def row_label(src: Source, row_index: int) -> str:
    """How a user finds row ``row_index`` (0-based) of a source: a line for JSONL, a row otherwise."""
    if src.fmt == "json" and src.path.suffix.lower() == ".jsonl":
        return f"{src.path}: line {row_index + 1}"
    if src.fmt == "csv":
        return f"{src.path}: data row {row_index + 1} (after the header)"
    return f"{src.path}: row {row_index + 1}"
