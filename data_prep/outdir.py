"""The output folder's life cycle: a private temporary sibling while building, an atomic rename when done.

A folder at data.output_dir is complete exactly when it holds manifest.json. Prep builds in
``.<name>.tmp-*`` beside it (same filesystem, so the rename is atomic), moves an older complete folder
aside only once the new one is finished, and removes temporary folders that a killed prep left behind.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import DataError

OWNER_FILE = ".owner"


def _owner() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_work_dirs(out_dir: Path) -> list[Path]:
    """Remove temporary siblings of ``out_dir`` left by a prep that was killed (its process is gone).

    Only folders made on this host are judged: a live run on another node of a shared filesystem is left alone.
    """
    removed = []
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for path in out_dir.parent.glob(pattern):
            try:
                host, pid = (path / OWNER_FILE).read_text().split()
            except (OSError, ValueError):
                continue
            if host == socket.gethostname() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a folder that prep did not write (it would be deleted)."""
    if out_dir.exists() and (not out_dir.is_dir() or
                             (any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file())):
        raise DataError(f"data.output_dir {out_dir} exists and is not a prepared-data folder (no manifest.json); "
                        f"prep only replaces its own output: remove it or choose another data.output_dir")


def _owned_temp_dir(out_dir: Path, kind: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{kind}-", dir=out_dir.parent))
    (path / OWNER_FILE).write_text(_owner())
    return path


def make_work_dir(out_dir: Path) -> Path:
    """A fresh temporary sibling of ``out_dir`` to build in (stale ones of killed runs are removed first)."""
    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work_dirs(out_dir)
    work = _owned_temp_dir(out_dir, "tmp")
    os.chmod(work, 0o777 & ~_umask())  # mkdtemp makes it private; the published folder should not be
    return work


def publish(work: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; an older complete one is removed only afterwards."""
    (work / OWNER_FILE).unlink()
    old = None
    if out_dir.exists():
        old = _owned_temp_dir(out_dir, "old")
        os.replace(out_dir, old / "prev")
    os.replace(work, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)
