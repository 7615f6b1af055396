"""Small atomic-file helpers shared by checkpoints and the teacher cache."""

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


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old or the new file, never a partial one."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
