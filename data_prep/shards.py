"""Stage 6, writing: packed sequences into .npy shards exactly as FORMAT.md describes.

Each shard's four .npy files are written by appending each batch of documents to open files while the
documents stream out of the Arrow dataset, and the mapped pages read are released after every batch
(pages.py), so memory holds one batch however large the split is. (Writing through ``np.memmap`` kept every
written page resident until the shard closed: 12 bytes per token of the shard.)
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


def write_shard(docs, out_dir: Path, split: str, name: str, rows: np.ndarray, seq_tokens: np.ndarray,
                release=lambda: None) -> dict:
    """Write one shard: ``rows`` (indices into ``docs``, a tokenized datasets.Dataset) one sequence after
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
        table = docs.select(rows).select_columns(["input_ids", "labels"]).with_format("arrow")
        for batch in table.iter(batch_size=READ_BATCH_DOCS):
            ids_col, labels_col = batch.column("input_ids").combine_chunks(), batch.column("labels").combine_chunks()
            ids, labels = ids_col.flatten().to_numpy(), labels_col.flatten().to_numpy()
            lens = np.diff(ids_col.offsets.to_numpy())
            # Positions restart at 0 at each document: index minus the start of the token's document.
            starts = np.repeat(np.cumsum(lens) - lens, lens)
            positions = (np.arange(len(ids), dtype=np.int64) - starts).astype(np.int32)
            for key, arr in (("input_ids", ids), ("labels", labels), ("position_ids", positions)):
                handles[key].write(np.ascontiguousarray(arr, dtype=np.int32).tobytes())
            supervised += int((labels != IGNORE_INDEX).sum())
            del batch, ids_col, labels_col, ids, labels
            release()
    finally:
        for fh in handles.values():
            fh.close()
    return {"name": name, "sequences": len(seq_tokens), "tokens": int(offsets[-1]),
            "supervised_tokens": supervised, "sha256": shard_checksum(files)}
