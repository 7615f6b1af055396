"""Loads the compiled extension monet_fast._C and checks it matches the running torch.

A `_C` built against another torch usually fails with an undefined-symbol ImportError deep in
the dynamic loader; we turn that (and a silent version mismatch) into a message that says to
rebuild.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

REBUILD_HINT = "rebuild it with `pip install -e . --no-build-isolation` (or `make install`)"


class ExtensionMismatchError(ImportError):
    """monet_fast._C is missing, stale, or built against another torch."""


def _normalise(version: str) -> str:
    return version.split("+")[0]


def check_build_info(info: dict, torch_version: str | None = None) -> None:
    """Raise ExtensionMismatchError if `info` (from _C.build_info()) does not fit this torch."""
    torch_version = torch_version or torch.__version__
    built = str(info.get("torch_version", "?"))
    if _normalise(built) != _normalise(torch_version):
        raise ExtensionMismatchError(
            f"monet_fast._C was built against torch {built} but torch {torch_version} is "
            f"installed; {REBUILD_HINT}"
        )


def load_extension() -> ModuleType:
    """Import monet_fast._C, raising ExtensionMismatchError with a rebuild hint on any problem."""
    try:
        ext = importlib.import_module("monet_fast._C")
    except ImportError as err:
        if "undefined symbol" in str(err) or "symbol not found" in str(err):
            raise ExtensionMismatchError(
                f"monet_fast._C does not match the installed torch {torch.__version__} "
                f"({err}); {REBUILD_HINT}"
            ) from err
        raise ExtensionMismatchError(f"monet_fast._C is not built ({err}); {REBUILD_HINT}") from err
    check_build_info(ext.build_info())
    return ext
