"""Stage 6, writing: packed sequences into .npy shards exactly as FORMAT.md describes.

Each shard's four .npy files are written by appending each batch of documents to open files while the
documents stream out of the Arrow dataset, and the mapped pages read are released after every batch
(pages.py), so memory holds one batch however large the split is. (Writing through ``np.memmap`` kept every
written page resident until the shard closed: 12 bytes per token of the shard.)

Documents come in packing order, scattered over the tokenized file. :class:`TokenRows` reads each one with
a ``pread`` of its bytes, at file offsets found from the Arrow buffers' positions in the file. Reading them
through the memory map instead made every scattered document fault in its neighbours too (the kernel maps
up to 64 KiB around a faulted file page), +45 MiB resident within one batch of 512 documents, and
``Dataset.select(rows)`` gathered each row through a table slice (~25 us a row, a tenth of prep's CPU time
in a profile); Arrow's own ``take`` on a chunked column first concatenates every chunk.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .format import ARRAYS, IGNORE_INDEX, shard_checksum, shard_files

READ_BATCH_DOCS = 512  # small: documents come in packing order, scattered over the file
_DTYPES = {"input_ids": np.int32, "labels": np.int32, "position_ids": np.int32, "offsets": np.int64}


def _open_arrays(files: dict[str, Path], n_tokens: int, n_seq: int) -> dict:
    """Each array's file, created at full size with its .npy header and opened for writing after it."""
    lengths = {"input_ids": n_tokens, "labels": n_tokens, "position_ids": n_tokens, "offsets": n_seq + 1}
    handles = {}
    for name in ARRAYS:
        # open_memmap writes the header numpy would (so the bytes match np.save) and sizes a sparse file.
        header = np.lib.format.open_memmap(files[name], mode="w+", dtype=_DTYPES[name], shape=(lengths[name],))
        data_offset = header.offset
        del header
        handles[name] = fh = open(files[name], "r+b")  # noqa: SIM115 - closed by write_shard
        fh.seek(data_offset)
    return handles


class TokenRows:
    """Documents of tokenized Arrow stream files (``input_ids`` and ``labels`` int32 list columns; the files
    in row order) by row index. Use as a context manager (it holds the files open)."""

    COLUMNS = ("input_ids", "labels")

    def __init__(self, paths: list[Path]):
        import pyarrow as pa

        self.fds, self.chunk_rows, self.where = [], [0], {name: [] for name in self.COLUMNS}
        for path in paths:
            mapped = pa.memory_map(str(path), "r")
            whole = mapped.read_buffer()  # zero-copy: its address is the file's first byte
            fd = os.open(path, os.O_RDONLY)
            self.fds.append(fd)
            for batch in pa.ipc.open_stream(whole):
                self.chunk_rows.append(self.chunk_rows[-1] + batch.num_rows)
                for name in self.COLUMNS:
                    lists = batch.column(name)
                    # ListArray.offsets index into ListArray.values (the unsliced child array).
                    values_at = lists.values.buffers()[1].address - whole.address + 4 * lists.values.offset
                    self.where[name].append((fd, values_at, lists.offsets.to_numpy()))
        self.chunk_rows = np.asarray(self.chunk_rows, dtype=np.int64)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds:
            os.close(fd)

    def read(self, name: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the tokens of ``rows`` one document after another, each document's length) of column ``name``."""
        chunk = np.searchsorted(self.chunk_rows, rows, side="right") - 1
        local = rows - self.chunk_rows[chunk]
        where, parts = self.where[name], []
        for c, i in zip(chunk.tolist(), local.tolist()):
            fd, values_at, offsets = where[c]
            start, end = int(offsets[i]), int(offsets[i + 1])
            parts.append(os.pread(fd, 4 * (end - start), values_at + 4 * start))
        lens = np.fromiter((len(p) // 4 for p in parts), dtype=np.int64, count=len(parts))
        return np.frombuffer(b"".join(parts), dtype=np.int32), lens


def write_shard(tokens: TokenRows, out_dir: Path, split: str, name: str, rows: np.ndarray, seq_tokens: np.ndarray,
                release=lambda: None) -> dict:
    """Write one shard: ``rows`` (row indices of the tokenized table ``tokens`` reads) one sequence after
    another, ``seq_tokens`` tokens per sequence.

    ``release()`` is called after every batch read (a PageReleaser hands the mapped pages back). Returns the
    shard's manifest entry.
    """
    offsets = np.concatenate([[0], np.cumsum(seq_tokens)]).astype(np.int64)
    files = shard_files(out_dir, split, name)
    files["input_ids"].parent.mkdir(parents=True, exist_ok=True)
    handles = _open_arrays(files, int(offsets[-1]), len(seq_tokens))
    supervised = 0
    try:
        handles["offsets"].write(offsets.tobytes())
        for start in range(0, len(rows), READ_BATCH_DOCS):
            batch = rows[start:start + READ_BATCH_DOCS]
            (ids, lens), (labels, _) = tokens.read("input_ids", batch), tokens.read("labels", batch)
            # Positions restart at 0 at each document: index minus the start of the token's document.
            starts = np.repeat(np.cumsum(lens) - lens, lens)
            positions = (np.arange(len(ids), dtype=np.int64) - starts).astype(np.int32)
            for key, arr in (("input_ids", ids), ("labels", labels), ("position_ids", positions)):
                handles[key].write(np.ascontiguousarray(arr, dtype=np.int32).tobytes())
            supervised += int((labels != IGNORE_INDEX).sum())
            del ids, labels, positions, starts
            release()
    finally:
        for fh in handles.values():
            fh.close()
    return {"name": name, "sequences": len(seq_tokens), "tokens": int(offsets[-1]),
            "supervised_tokens": supervised, "sha256": shard_checksum(files)}
