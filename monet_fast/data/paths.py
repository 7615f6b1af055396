"""Where a dataset's image paths may point: inside the dataset root, unless the caller allows more.

Every reader (Monet-SFT rows, RL prompt files, the benchmark readers) resolves the image paths it
reads from a file through `resolve_image_path`, so a hostile or careless dataset cannot make
training or evaluation open `/etc/shadow`, `../../secrets.png` or a symlink out of the dataset
folder. `allow_outside_root=True` (config key `data.allow_outside_root`) turns the check off for
trusted data that legitimately points elsewhere.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from monet_fast.data.errors import DataError

ALLOW_HINT = "set data.allow_outside_root: true (allow_outside_root=True) for trusted data"


def _check_encodable(value: str, what: str) -> None:
    # Lone surrogates (valid in JSON "\ud800", invalid in file names) and NUL bytes make os calls
    # raise UnicodeEncodeError / ValueError deep inside PIL; refuse them here with the value.
    if "\x00" in value:
        raise DataError(f"{what} {value!r} contains a NUL character")
    try:
        os.fsencode(value)
    except UnicodeEncodeError as err:
        raise DataError(f"{what} {value!r} is not a valid file name ({err.reason})") from None


@functools.lru_cache(maxsize=64)
def _real_root(root: str) -> str:
    # A reader checks every image of a dataset against the same root: resolve it once.
    return os.path.realpath(root)


def check_inside_root(
    root: str | os.PathLike, path: str | os.PathLike, *, allow_outside_root: bool = False
) -> Path:
    """`path` itself if, with symlinks resolved, it lies inside `root`; else DataError.

    The file need not exist (lazy readers check paths before any file is opened).
    """
    path = Path(path)
    if allow_outside_root:
        return path
    real_root = _real_root(os.fspath(root))
    real = os.path.realpath(path)
    if real != real_root and os.path.commonpath([real_root, real]) != real_root:
        via = "" if os.path.normpath(os.path.abspath(path)) == real else " (through a symlink)"
        raise DataError(
            f"image path {str(path)!r} resolves to {real!r}{via}, outside the dataset root "
            f"{str(root)!r}; {ALLOW_HINT}"
        )
    return path


def resolve_image_path(
    root: str | os.PathLike, rel: object, *, allow_outside_root: bool = False
) -> Path:
    """`root / rel` for an image path `rel` read from a dataset file, refusing escapes.

    Refused (DataError naming `rel` and the root) unless `allow_outside_root`: an absolute path
    (POSIX or Windows style), and a path that leaves `root` once `..` and symlinks are resolved.
    Always refused: a non-string or empty path, NUL characters, unencodable unicode.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise DataError(f"image path must be a non-empty string, got {rel!r}")
    _check_encodable(rel, "image path")
    if allow_outside_root:
        return Path(root) / rel
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute():
        raise DataError(
            f"absolute image path {rel!r}: paths must be relative to the dataset root "
            f"{str(root)!r}; {ALLOW_HINT}"
        )
    return check_inside_root(root, Path(root) / rel)


__all__ = ["ALLOW_HINT", "check_inside_root", "resolve_image_path"]
