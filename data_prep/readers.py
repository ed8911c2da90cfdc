"""Reading data.sources (CSV, JSONL, Parquet, `save_to_disk` folders) into Arrow-backed datasets.

Reading goes through the `datasets` library, which converts every file to memory-mapped Arrow, so later
stages stream over rows instead of holding them. When a file fails to parse, :func:`diagnose` re-reads it
line by line to name the exact line (the parsers' own messages often point at the wrong place).
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
RECORD_TYPES = ("messages", "prompt_response", "text")


@dataclass(frozen=True)
class Source:
    """One input: a file (csv/json/parquet) or a folder written by ``datasets.save_to_disk`` (arrow)."""

    path: Path
    fmt: str

    def files(self) -> list[Path]:
        """Every file whose bytes make up this source (for content hashing)."""
        if self.path.is_dir():
            return sorted(p for p in self.path.rglob("*") if p.is_file())
        return [self.path]


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file() or \
        (folder / "state.json").is_file()


def expand_sources(sources: list[str]) -> list[Source]:
    """Resolve data.sources into files/folders with a known format; folders of plain files are expanded."""
    if not sources:
        raise DataError("data.sources is empty: list CSV, JSONL or Parquet files, or save_to_disk folders")
    out: list[Source] = []
    for i, raw in enumerate(sources):
        path = Path(raw)
        if not path.exists():
            raise DataError(f"data.sources[{i}]: {raw} does not exist; fix the path (relative paths are read "
                            f"from the current directory, {Path.cwd()})")
        if path.is_dir() and _is_saved_dataset(path):
            out.append(Source(path, "arrow"))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in FORMATS)
            if not found:
                raise DataError(f"data.sources[{i}]: folder {raw} holds no .csv/.jsonl/.json/.parquet file and "
                                f"is not a datasets.save_to_disk folder")
            out.extend(Source(p, FORMATS[p.suffix.lower()]) for p in found)
        elif path.suffix.lower() in FORMATS:
            out.append(Source(path, FORMATS[path.suffix.lower()]))
        else:
            raise DataError(f"data.sources[{i}]: {raw} has an unknown extension {path.suffix!r}; use one of "
                            f"{', '.join(FORMATS)} or a datasets.save_to_disk folder")
    return out


def read_source(src: Source, cache_dir: Path, num_proc: int = 1):
    """Load one source as a ``datasets.Dataset`` (Arrow, memory-mapped); raise DataError naming the bad line."""
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
        else:
            reader = {"csv": datasets.Dataset.from_csv, "json": datasets.Dataset.from_json,
                      "parquet": datasets.Dataset.from_parquet}[src.fmt]
            # CSV cells are text: a numeric-looking answer ("42") stays text, and a BOM is not part of a name.
            extra = {"features": _csv_text_features(src.path), "encoding": "utf-8-sig"} if src.fmt == "csv" else {}
            ds = reader(str(src.path), cache_dir=str(cache_dir), num_proc=num_proc if num_proc > 1 else None, **extra)
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


def _csv_text_features(path: Path):
    """Every column of a CSV as text (header names read with the csv module)."""
    from datasets import Features, Value

    with open(path, newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    return Features({name: Value("string") for name in header}) if header else None


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


def resolve_record_type(columns: list[str], cfg, src: Source) -> str:
    """The record shape of one source: the configured one (its columns must exist) or, for auto, inferred."""
    needed = {"messages": [("data.messages_column", cfg.messages_column)],
              "prompt_response": [("data.prompt_column", cfg.prompt_column),
                                  ("data.response_column", cfg.response_column)],
              "text": [("data.text_column", cfg.text_column)]}
    if cfg.record_type != "auto":
        for key, name in needed[cfg.record_type]:
            if name not in columns:
                raise DataError(f"{src.path}: column {name!r} ({key}, record_type {cfg.record_type}) not found; "
                                f"columns found: {', '.join(columns)}; set {key} to one of them")
        return cfg.record_type
    for kind in RECORD_TYPES:
        if all(name in columns for _, name in needed[kind]):
            return kind
    return _raise_auto_failed(columns, cfg, src)


def _raise_auto_failed(columns, cfg, src) -> str:
    raise DataError(f"{src.path}: data.record_type auto found none of: a {cfg.messages_column!r} column "
                    f"(data.messages_column), {cfg.prompt_column!r} + {cfg.response_column!r} "
                    f"(data.prompt_column, data.response_column), or {cfg.text_column!r} (data.text_column); "
                    f"columns found: {', '.join(columns)}; set those keys to your column names")


def row_label(src: Source, row_index: int) -> str:
    """How a user finds row ``row_index`` (0-based) of a source: a line for JSONL, a row otherwise."""
    if src.fmt == "json" and src.path.suffix.lower() == ".jsonl":
        return f"{src.path}: line {row_index + 1}"
    if src.fmt == "csv":
        return f"{src.path}: data row {row_index + 1} (after the header)"
    return f"{src.path}: row {row_index + 1}"
