"""Stage 6, writing: packed sequences into .npy shards exactly as FORMAT.md describes.

Each shard's four .npy files are written by appending each batch of documents to open files while the
documents stream out of the Arrow dataset, and the mapped pages read are released after every batch
(pages.py), so memory holds one batch however large the split is. (Writing through ``np.memmap`` kept every
written page resident until the shard closed: 12 bytes per token of the shard.)

Documents come in packing order, scattered over the tokenized file. :class:`TokenRows` reads them as
slices of zero-copy numpy views of the mapped Arrow buffers: a slice per document costs about a
microsecond, where ``Dataset.select(rows)`` followed by iteration gathered each row through a table slice
(~25 us a row, a tenth of prep's CPU time in a profile), and Arrow's own ``take`` on a chunked column
first concatenates every chunk (the whole column in memory).
"""

from __future__ import annotations

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
    """Documents of a tokenized Arrow table (``input_ids`` and ``labels`` list columns) by row index, read as
    slices of zero-copy views of its buffers, so only the pages of the rows read become resident."""

    def __init__(self, table):
        chunks = {name: table.column(name).chunks for name in ("input_ids", "labels")}
        self.chunk_starts = np.cumsum([0] + [len(c) for c in chunks["input_ids"]])
        # ListArray.offsets index into ListArray.values (the unsliced child), chunk by chunk.
        self.views = {name: [(c.offsets.to_numpy(), c.values.to_numpy()) for c in chunks[name]] for name in chunks}

    def read(self, name: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the tokens of ``rows`` one document after another, each document's length) of column ``name``."""
        chunk = np.searchsorted(self.chunk_starts, rows, side="right") - 1
        local = rows - self.chunk_starts[chunk]
        views = self.views[name]
        parts = [views[c][1][views[c][0][i]:views[c][0][i + 1]] for c, i in zip(chunk.tolist(), local.tolist())]
        lens = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)), lens


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
