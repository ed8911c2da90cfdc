"""Atomic checkpoints in the run directory, and finding the one to resume from.

Layout (export reads it; keep it exactly)::

    <output_dir>/checkpoints/<tag>/      tag = step-%08d
        DeepSpeed's files (engine.save_checkpoint, save_latest=False)
        zerotune_state.json              step, epoch, data position, hashes, eval losses (rank 0)
        rng-rank<r>.safetensors          each rank's torch RNG state; python/numpy states in its metadata
        probe.safetensors                fixed-batch logits, for export to verify consolidated weights
        COMPLETE                         empty; written by rank 0 after every rank finished
    <output_dir>/checkpoints/latest      text: the newest complete tag (temp file + os.replace)
    <output_dir>/checkpoints/save_times.jsonl     one line per full save: tag and measured seconds (rank 0)
    <output_dir>/checkpoints/best        text: the tag with the best validation loss
    <output_dir>/checkpoints/best-weights/<tag>/   that tag's weights only (training precision, safetensors
                                         shards), probe.safetensors, best.json, COMPLETE (training.best_weights)
    <output_dir>/checkpoints/<tag>-universal/      DeepSpeed's universal form of <tag> (ds_to_universal), made
                                         once, when a run resumes <tag> on another world size; COMPLETE

A checkpoint without ``COMPLETE`` is never loaded: a process killed during a save leaves one behind, and
``latest`` still names the previous complete one. ``COMPLETE`` is written only after every file and the
folder itself are flushed to disk (:func:`mark_complete`), so a power loss cannot leave a marked
checkpoint with missing data.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "zerotune_state.json"
SAVE_TIMES_FILE = "save_times.jsonl"
UNIVERSAL_SUFFIX = "-universal"
UNIVERSAL_STAGING = ".universal-staging"
COMPLETE_MARKER = "COMPLETE"
TAG_PATTERN = re.compile(r"^step-(\d{8})$")


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed by this run as configured (says what to do instead)."""

    user_error = True


def tag_for_step(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file() and (folder / STATE_FILE).is_file()


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(folder: Path) -> None:
    """Flush every file under ``folder`` and the folders themselves, then write ``COMPLETE`` and flush it
    and the folder again (rank 0, after every rank has written its files). Without the first flushes a
    crash could keep the marker's folder entry while data written before it is lost."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_path(path)
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync_path(sub)
    fsync_path(folder)
    marker = folder / COMPLETE_MARKER
    marker.touch()
    fsync_path(marker)
    fsync_path(folder)


def write_pointer(root: Path, name: str, tag: str) -> None:
    """Point ``root/name`` at ``tag`` atomically (rank 0 only)."""
    tmp = root / f".{name}.tmp"
    tmp.write_text(tag + "\n", encoding="utf-8")
    os.replace(tmp, root / name)


def record_save_time(root: Path, tag: str, seconds: float) -> None:
    """Append a full save's measured wall time (rank 0), for `zerotune slurm`'s --warn-seconds check."""
    with open(root / SAVE_TIMES_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"tag": tag, "seconds": round(seconds, 3)}) + "\n")


def last_save_time(root: Path) -> tuple[str, float] | None:
    """(tag, seconds) of the last recorded full save under ``root``, or None."""
    try:
        lines = (root / SAVE_TIMES_FILE).read_text(encoding="utf-8").splitlines()
        record = json.loads(lines[-1])
        return str(record["tag"]), float(record["seconds"])
    except (OSError, IndexError, ValueError, KeyError, TypeError):
        return None


def read_pointer(root: Path, name: str) -> str | None:
    """The tag ``root/name`` holds, or None when missing, unreadable or not naming a complete checkpoint."""
    try:
        tag = (root / name).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if TAG_PATTERN.match(tag) and is_complete(root / tag):
        return tag
    return None


def complete_tags(root: Path) -> list[str]:
    """Every complete tag under ``root``, oldest first."""
    if not root.is_dir():
        return []
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
    return [t for t in tags if is_complete(root / t)]


def find_resume_tag(root: Path) -> tuple[str | None, list[str]]:
    """The tag to resume from and warnings: ``latest`` when it names a complete checkpoint, else the newest
    complete one (warning that ``latest`` is missing or corrupt); newer incomplete checkpoints (a save that
    was interrupted) are skipped with a warning.
    """
    tags, notes = complete_tags(root), []
    chosen = read_pointer(root, "latest")
    if chosen is None and tags:
        chosen = tags[-1]
        notes.append(f"{root / 'latest'} is missing or does not name a complete checkpoint; resuming from the "
                     f"newest complete one, {chosen}")
    if chosen is not None:
        newer = sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)
                       and p.name > chosen and not is_complete(p))
        if newer:
            notes.append(f"skipping incomplete checkpoint(s) {', '.join(newer)} in {root} (a save was "
                         f"interrupted); resuming from {chosen}")
    return chosen, notes


def resume_splits_decay(root: Path) -> bool | None:
    """Whether the checkpoint a resume would load keeps its optimizer state in two parameter groups
    (decay, and none for biases and norms) rather than one; None when there is nothing to resume or its
    state file cannot be read (the resume itself then reports it).

    Checkpoints written before zerotune_state.json recorded the group count always split.
    """
    if not root.is_dir():
        return None
    tag, _ = find_resume_tag(root)
    if tag is None:
        return None
    try:
        state = json.loads((root / tag / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    groups = state.get("optimizer_param_groups", "legacy")
    return groups == "legacy" or groups == 2


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict:
    """This rank's RNG states as they are now (torch CPU and accelerator, python, numpy); cheap (~tens of
    microseconds), so the driver can take one before anything of a step draws random numbers."""
    state = {"torch_cpu": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def save_rng_state(path: Path, state: dict | None = None) -> None:
    """Save ``state`` (from :func:`capture_rng_state`; by default the current one): torch states as
    tensors, python and numpy in metadata."""
    from safetensors.torch import save_file

    state = state or capture_rng_state()
    tensors = {k: state[k] for k in ("torch_cpu", "torch_cuda") if k in state}
    py_version, py_state, py_gauss = state["python"]
    np_state = state["numpy"]
    meta = {"python": json.dumps([py_version, list(py_state), py_gauss]),
            "numpy": json.dumps([np_state[0], np_state[1].tolist(), *[_plain(x) for x in np_state[2:]]])}
    save_file(tensors, str(path), metadata=meta)


def _plain(x):
    return x.item() if hasattr(x, "item") else x


def load_rng_state(path: Path) -> None:
    """Restore what :func:`save_rng_state` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        torch.set_rng_state(fh.get_tensor("torch_cpu"))
        if torch.cuda.is_available() and "torch_cuda" in fh.keys():
            torch.cuda.set_rng_state(fh.get_tensor("torch_cuda"))
    version, state, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- pruning


def prune(root: Path, keep_last: int, keep_tags: set[str]) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints and ``keep_tags``; returns the deleted.

    Incomplete folders older than the newest complete one are left over from interrupted saves and go too.
    """
    tags = complete_tags(root)
    keep = set(tags[-keep_last:]) | keep_tags
    newest = tags[-1] if tags else ""
    doomed = [p for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name) and p.name not in keep
              and (p.name in tags or p.name < newest)]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(universal_folder(root, folder.name), ignore_errors=True)
    return sorted(p.name for p in doomed)


# --------------------------------------------------------------------------- another world size


def universal_folder(root: Path, tag: str) -> Path:
    """Where ``tag``'s universal form lives: a sibling folder, ``<tag>-universal``."""
    return root / f"{tag}{UNIVERSAL_SUFFIX}"


def convert_to_universal(root: Path, tag: str, saved_world_size: int) -> Path:
    """``tag`` in DeepSpeed's universal checkpoint form (rank 0 only), made once: converted with
    ``deepspeed.checkpoint.ds_to_universal`` into a staging folder, marked complete, then renamed into
    place, so a crash mid-way leaves nothing that looks finished. Raises ResumeError when DeepSpeed cannot
    convert it.

    Cost: the conversion reads every rank's optimizer shards and writes one fp32 file per parameter and
    state (weights, both Adam moments): ~12 bytes per parameter, 840 GB for a 70B model, written once.
    """
    final = universal_folder(root, tag)
    if (final / COMPLETE_MARKER).is_file():
        return final
    staging = root / UNIVERSAL_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    work = staging / final.name
    work.mkdir(parents=True)
    args = argparse.Namespace(input_folder=str(root / tag), output_folder=str(work), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    try:
        from deepspeed.checkpoint import ds_to_universal

        with contextlib.redirect_stdout(io.StringIO()):  # its progress report; our one line says what happened
            ds_to_universal.main(args)
    except Exception as exc:  # DeepSpeed raises assertion, value and runtime errors alike here
        shutil.rmtree(staging, ignore_errors=True)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise ResumeError(f"{root / tag}: DeepSpeed cannot convert this checkpoint to the universal form a new "
                          f"world size needs ({type(exc).__name__}: {reason}); resume with {saved_world_size} "
                          f"data-parallel ranks, as it was saved, or start a new output_dir") from None
    mark_complete(work)
    shutil.rmtree(final, ignore_errors=True)  # an unfinished one from an earlier attempt (no COMPLETE)
    os.replace(work, final)
    fsync_path(root)
    shutil.rmtree(staging, ignore_errors=True)
    return final
