"""Reading and checking the shard format described in FORMAT.md (readers live here; the writer in shards.py)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_NAME = "zerotune-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
ARRAYS = ("input_ids", "labels", "position_ids", "offsets")
IGNORE_INDEX = -100


class ManifestError(ValueError):
    """A prepared-data folder that is missing, incomplete, of an unknown version, or corrupt."""

    user_error = True


def load_manifest(data_dir: str | Path) -> dict:
    """Load and check ``manifest.json`` of a prepared-data folder."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise ManifestError(f"{path} not found: run `zerotune prep CONFIG` first (a folder without a manifest "
                            f"is incomplete)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); delete {Path(data_dir)} and run "
                            f"`zerotune prep` again") from None
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}"
                            f" is not readable here (reads {FORMAT_NAME} version {FORMAT_VERSION}); "
                            f"run `zerotune prep` again")
    return manifest


def shard_files(data_dir: str | Path, split: str, shard_name: str) -> dict[str, Path]:
    base = Path(data_dir) / split
    return {name: base / f"{shard_name}.{name}.npy" for name in ARRAYS}


def sha256_files(paths: list[Path]) -> str:
    """sha256 over the given files' bytes in order, read in 1 MiB chunks (files may be large)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def shard_checksum(files: dict[str, Path]) -> str:
    """sha256 over the shard's four .npy files' bytes, in ARRAYS order."""
    return sha256_files([files[name] for name in ARRAYS])


@dataclass
class Shard:
    """One shard, memory-mapped. ``sequence(i)`` returns views, never copies the whole shard."""

    name: str
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    offsets: np.ndarray

    @classmethod
    def open(cls, data_dir: str | Path, split: str, shard_name: str) -> "Shard":
        files = shard_files(data_dir, split, shard_name)
        arrays = {k: np.load(p, mmap_mode="r") for k, p in files.items()}
        return cls(name=shard_name, **arrays)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[lo:hi], self.labels[lo:hi], self.position_ids[lo:hi]


def verify_shards(data_dir: str | Path, manifest: dict | None = None) -> None:
    """Recompute every shard's checksum against the manifest; raise ManifestError naming the first bad one."""
    manifest = manifest or load_manifest(data_dir)
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            files = shard_files(data_dir, split, shard["name"])
            missing = [str(p) for p in files.values() if not p.is_file()]
            if missing:
                raise ManifestError(f"shard {split}/{shard['name']} is missing {missing[0]}; run `zerotune prep` again")
            if shard_checksum(files) != shard["sha256"]:
                raise ManifestError(f"shard {split}/{shard['name']} in {data_dir} does not match its checksum in "
                                    f"manifest.json (corrupt or changed); run `zerotune prep` again")


# dtype of each array and its length from a shard's manifest entry (FORMAT.md).
_ARRAY_LAYOUT = {"input_ids": ("<i4", "tokens", 0), "labels": ("<i4", "tokens", 0),
                 "position_ids": ("<i4", "tokens", 0), "offsets": ("<i8", "sequences", 1)}


def check_shard_files(data_dir: str | Path, manifest: dict) -> None:
    """Cheap check of every shard file against the manifest: present, a .npy header with the dtype and
    length the manifest implies, and exactly as many bytes as that header says. Reads headers only
    (the full checksums are ``verify_shards``'s, run by `zerotune launch`); raises ManifestError naming
    the first bad file."""
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            for name, path in shard_files(data_dir, split, shard["name"]).items():
                dtype, count_key, extra = _ARRAY_LAYOUT[name]
                problem = _npy_problem(path, np.dtype(dtype), (int(shard[count_key]) + extra,))
                if problem:
                    raise ManifestError(f"{path}: {problem}, not what manifest.json says (truncated, corrupt or "
                                        f"from another prep); copy the data folder again or run `zerotune prep "
                                        f"CONFIG --force`")


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npy_problem(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> str | None:
    """What is wrong with one .npy file against the expected dtype and shape, or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = _NPY_HEADER_READERS.get(version)
            if read_header is None:
                return f"has .npy format version {version}, which prep never writes"
            got_shape, _, got_dtype = read_header(fh)
            data_start = fh.tell()
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as exc:
        return f"unreadable .npy header ({exc})"
    if got_dtype != dtype or tuple(got_shape) != shape:
        return f"holds {got_dtype.str}{list(got_shape)}, expected {dtype.str}{list(shape)}"
    expected = data_start + dtype.itemsize * int(np.prod(shape))
    if size != expected:
        return f"has {size} bytes, its header says {expected}"
    return None


def tokenizer_hash(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary and special tokens (the manifest's ``tokenizer.hash``).

    Training compares it with its own tokenizer's and refuses shards made by another one.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {"map": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
               "added": sorted((int(i), str(t)) for i, t in tokenizer.added_tokens_decoder.items())}
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
