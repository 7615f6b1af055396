"""Optional dependencies: which extra installs each one, and one way to import them lazily.

Everything monet_fast needs at import time is a core dependency (pyproject.toml); the packages
below are imported inside the functions that use them, through `require`, so that a missing one
stops with one line naming the extra to install instead of a traceback from deep inside a run:

    deepspeed = require("deepspeed", "training")
    # MissingDependencyError: deepspeed is not installed; training needs it:
    #   pip install 'monet_fast[train]'

Triton is a core dependency on Linux (the kernels are the product) and optional elsewhere,
where it has no wheels; the `kernels` extra names it for completeness.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from types import ModuleType

# import name -> (distribution name, extra of monet_fast that installs it, or None if none does)
OPTIONAL: dict[str, tuple[str, str | None]] = {
    "deepspeed": ("deepspeed", "train"),
    "peft": ("peft", "lora"),
    "bitsandbytes": ("bitsandbytes", None),
    "matplotlib": ("matplotlib", "plots"),
    "triton": ("triton", "kernels"),
    "flash_attn": ("flash-attn", None),
    "tensorboard": ("tensorboard", None),
    "wandb": ("wandb", None),
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
}


class MissingDependencyError(ModuleNotFoundError):
    """An optional dependency is not installed; the message says which extra installs it."""


def install_hint(module: str) -> str:
    """The pip command that installs the optional dependency `module` (its top-level name)."""
    dist, extra = OPTIONAL[module]
    return f"pip install 'monet_fast[{extra}]'" if extra else f"pip install {dist}"


def missing_message(module: str, purpose: str | None = None) -> str:
    """One line: `module` is not installed, what needs it, and how to install it."""
    root = module.split(".")[0]
    needed = f"; {purpose} needs it" if purpose else ""
    return f"{root} is not installed{needed}: {install_hint(root)}"


def require(module: str, purpose: str | None = None) -> ModuleType:
    """Import `module` (an optional dependency or one of its submodules) and return it.

    Raises MissingDependencyError with `missing_message` when the package itself is absent; a
    missing dependency *of* the package (a broken install) re-raises the original error.
    """
    root = module.split(".")[0]
    if root not in OPTIONAL:
        raise KeyError(f"{root!r} is not a known optional dependency; known: {sorted(OPTIONAL)}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or not (module == err.name or module.startswith(err.name + ".")):
            raise
        raise MissingDependencyError(missing_message(module, purpose), name=root) from err


def as_missing_dependency(err: ModuleNotFoundError) -> MissingDependencyError | None:
    """The MissingDependencyError for a plain ModuleNotFoundError of an optional dependency
    (an import that did not go through `require`), else None."""
    if isinstance(err, MissingDependencyError):
        return err
    root = (err.name or "").split(".")[0]
    if root not in OPTIONAL:
        return None
    return MissingDependencyError(missing_message(root), name=root)


def exit_missing_dependency(err: ModuleNotFoundError, prog: str) -> int:
    """For command-line entry points: print `prog: error: <missing_message>` on stderr and
    return exit code 2 when `err` is an optional dependency; re-raise any other missing module
    (a bug, whose traceback is wanted)."""
    missing = as_missing_dependency(err)
    if missing is None:
        raise err
    print(f"{prog}: error: {missing}", file=sys.stderr)
    return 2


def available(module: str) -> bool:
    """Is the optional dependency `module` importable (found on sys.path; not imported)?"""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a None entry in sys.modules
        return False


def version(module: str) -> str | None:
    """Installed version of the optional dependency `module`, None when it is not importable."""
    if not available(module):
        return None
    try:
        return importlib.metadata.version(OPTIONAL[module][0])
    except importlib.metadata.PackageNotFoundError:  # importable but not pip-installed
        return "unknown version"
