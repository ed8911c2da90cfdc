"""Stage 6, writing: packed sequences into .npy shards exactly as FORMAT.md describes.

Each shard is written through memory-mapped .npy files while streaming its documents out of the Arrow
dataset in batches, so memory stays flat however large the split is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .format import ARRAYS, IGNORE_INDEX, shard_checksum, shard_files

READ_BATCH_DOCS = 2048


def _open_arrays(files: dict[str, Path], n_tokens: int, n_seq: int) -> dict[str, np.ndarray]:
    shapes = {"input_ids": (n_tokens, np.int32), "labels": (n_tokens, np.int32),
              "position_ids": (n_tokens, np.int32), "offsets": (n_seq + 1, np.int64)}
    return {name: np.lib.format.open_memmap(files[name], mode="w+", dtype=shapes[name][1],
                                            shape=(shapes[name][0],)) for name in ARRAYS}


def write_shard(docs, out_dir: Path, split: str, name: str, sequences: list[list[int]],
                doc_lengths: np.ndarray) -> dict:
    """Write one shard of ``sequences`` (lists of row indices into ``docs``, a tokenized datasets.Dataset).

    Returns the shard's manifest entry.
    """
    order = [d for seq in sequences for d in seq]
    seq_tokens = np.array([int(doc_lengths[seq].sum()) for seq in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(seq_tokens)]).astype(np.int64)
    files = shard_files(out_dir, split, name)
    files["input_ids"].parent.mkdir(parents=True, exist_ok=True)
    arrays = _open_arrays(files, int(offsets[-1]), len(sequences))
    arrays["offsets"][:] = offsets
    pos = 0
    table = docs.select(order).select_columns(["input_ids", "labels"]).with_format("arrow")
    for batch in table.iter(batch_size=READ_BATCH_DOCS):
        ids_col, labels_col = batch.column("input_ids").combine_chunks(), batch.column("labels").combine_chunks()
        ids, labels = ids_col.flatten().to_numpy(), labels_col.flatten().to_numpy()
        lens = np.diff(ids_col.offsets.to_numpy())
        n = len(ids)
        arrays["input_ids"][pos:pos + n] = ids
        arrays["labels"][pos:pos + n] = labels
        # Positions restart at 0 at each document: index minus the start of the token's document.
        starts = np.repeat(np.cumsum(lens) - lens, lens)
        arrays["position_ids"][pos:pos + n] = np.arange(n, dtype=np.int64) - starts
        pos += n
    supervised = int((arrays["labels"] != IGNORE_INDEX).sum())
    for arr in arrays.values():
        arr.flush()
    del arrays
    return {"name": name, "sequences": len(sequences), "tokens": int(offsets[-1]),
            "supervised_tokens": supervised, "sha256": shard_checksum(files)}
