"""Checkpoint manifests: the size and SHA-256 of every file a checkpoint directory holds.

`seal(dir)` fsyncs every file under `dir` while hashing it and writes `manifest.json` (atomic,
durable); `verify(dir)` re-reads the files and names the first thing that is wrong. SHA-256 is the
hash because it is the fastest hashlib offers here (SHA-NI: ~1.7 GB/s on the CPU machines against
~0.9 GB/s for blake2b); files are hashed on a small thread pool (hashlib releases the GIL), so
sealing a checkpoint costs about one read of it, which the page cache usually serves.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from monet_fast._io import atomic_write_text, fsync_dir

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 8 << 20


def _hash_file(path: Path, *, sync: bool) -> tuple[int, str]:
    """(size, sha256 hex) of `path`; with `sync`, also fsync it (one open for both)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


def _files(directory: Path) -> list[str]:
    out = []
    for base, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(base, name), directory)
            if rel != MANIFEST:
                out.append(rel)
    return out


def _hash_all(directory: Path, rels: list[str], *, sync: bool) -> list[tuple[int, str]]:
    workers = max(1, min(8, os.cpu_count() or 1, len(rels)))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda r: _hash_file(directory / r, sync=sync), rels))


def seal(directory: str | os.PathLike, **meta: Any) -> dict:
    """fsync every file under `directory` (and its subdirectories), then write its manifest.

    `meta` (tag, world size, ...) is stored alongside the file list for humans.
    """
    directory = Path(directory)
    rels = _files(directory)
    files = {
        rel: {"size": size, "sha256": digest}
        for rel, (size, digest) in zip(rels, _hash_all(directory, rels, sync=True), strict=True)
    }
    for base, _dirs, _names in os.walk(directory):
        fsync_dir(base)
    manifest = {"format": FORMAT, **meta, "files": files}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify(directory: str | os.PathLike) -> str | None:
    """None if `directory` matches its manifest, else what is wrong (missing file, size or hash
    mismatch, unreadable manifest). A directory without a manifest (written before manifests
    existed) passes: there is nothing to check it against."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} is missing"
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}: unreadable manifest ({e})"
    rels = sorted(files)
    for rel in rels:
        p = directory / rel
        if not p.is_file():
            return f"{p}: missing (listed in {MANIFEST})"
        size = p.stat().st_size
        if size != files[rel]["size"]:
            return f"{p}: size {size}, manifest says {files[rel]['size']}"
    for rel, (_, digest) in zip(rels, _hash_all(directory, rels, sync=False), strict=True):
        if digest != files[rel]["sha256"]:
            return f"{directory / rel}: sha256 {digest[:16]}..., manifest says {files[rel]['sha256'][:16]}..."
    return None


__all__ = ["MANIFEST", "seal", "verify"]
