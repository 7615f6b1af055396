"""Lazy package exports (PEP 562): a package lists `name -> module` and each name is imported
from its module on first use.

Why: `monet_fast.model`, `monet_fast.decode` and `monet_fast.train` are imported to build the CLI
parser and by light modules (data, tokens); importing their heavy members eagerly would pull
transformers, DeepSpeed or the Triton kernels into every command, and break
`from monet_fast.model import tiny_model` where Triton is not installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`; `exports` maps a name to its absolute module.

    A resolved name is stored in the package `namespace` so later lookups skip `__getattr__`.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
