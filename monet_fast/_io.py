"""Atomic, durable file writes (temp file in the same directory, fsync, os.replace, fsync of the
directory), used package-wide: readers see the old or the new file, never a partial one, and after
the call returns the new file survives a power loss."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask_mode(path: str | os.PathLike) -> None:
    """mkstemp creates 0600 files; give them the mode a plain open() would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def temp_sibling(path: Path) -> str:
    """A new empty temp file next to `path` (same filesystem, so os.replace is atomic)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask_mode(tmp)
    return tmp


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so that renames and new entries in it are durable (POSIX)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (creating the parent directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself must survive a crash too
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
