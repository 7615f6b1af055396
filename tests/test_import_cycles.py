"""Import cycles counting every import: lazy (inside functions) and `TYPE_CHECKING` ones too.

test_layering.py forbids cycles among import-time imports; a cycle through a lazy or
type-checking import still ties two modules together (neither can be read, moved or tested
without the other), so none is allowed here beyond the ones listed in KNOWN, each to be broken
by its owner. Read from the source with `ast`, nothing is imported (~0.1 s).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from test_layering import SOURCES, _resolve

# Cycles that exist today (strongly connected components), each with who should break it. A
# cycle that grows (a module joins it) is a new one.
KNOWN: dict[frozenset[str], str] = {}


def _main_guard(node: ast.stmt) -> bool:
    """A top-level `if __name__ == "__main__":` block. Its imports run only when the file is
    executed as `python -m pkg.mod`, as the module `__main__`, never when `pkg.mod` is imported,
    so they are edges of `__main__`, not of `pkg.mod`: they cannot close a cycle through it."""
    return isinstance(node, ast.If) and ast.unparse(node.test) in (
        '__name__ == "__main__"',
        "__name__ == '__main__'",
    )


def _all_imports(module: str, path: Path, sources: dict[str, Path]) -> set[str]:
    """Every monet_fast module one file imports, wherever the import statement is."""
    tree = ast.parse(path.read_text(), filename=str(path))
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    names: set[str] = set()
    body = [n for top in tree.body for n in (top.orelse if _main_guard(top) else [top])]
    for node in (n for top in body for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            pkg = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(pkg + ([node.module] if node.module else []))
            names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names)
    out = set()
    for name in names:
        if name.split(".")[0] == "monet_fast":
            target = _resolve(name, sources)
            if target is not None and target != module:
                out.add(target)
    return out


def import_graph(sources: dict[str, Path] = SOURCES) -> dict[str, set[str]]:
    return {m: _all_imports(m, p, sources) for m, p in sources.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_import_cycles_counting_lazy_and_type_checking_imports(graph):
    new = [sorted(c) for c in cycles(graph) if c not in KNOWN]
    assert not new, "import cycles (lazy and TYPE_CHECKING imports count):\n" + "\n".join(
        " <-> ".join(c) for c in new
    )


def test_the_cycles_broken_here_stay_broken(graph):
    # decode.config holds DecodeConfig (host no longer imports engine); model.quantize and
    # model.unwrap hold what loading and the adapters needed from lora.

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            x = todo.pop()
            if x == b:
                return True
            if x not in seen:
                seen.add(x)
                todo.extend(graph.get(x, ()))
        return False

    assert not reaches("monet_fast.decode.host", "monet_fast.decode.engine")
    assert not reaches("monet_fast.model.loading", "monet_fast.model.lora")
    assert reaches("monet_fast.model.lora", "monet_fast.model.loading")  # the one direction


def test_the_checker_sees_lazy_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "monet_fast" / "data"
    pkg.mkdir(parents=True)
    a, b = pkg / "cyc_a.py", pkg / "cyc_b.py"
    a.write_text("def f():\n    from monet_fast.data import cyc_b\n")
    b.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .cyc_a import f\n")
    fake = {"monet_fast.data.cyc_a": a, "monet_fast.data.cyc_b": b}
    assert cycles(import_graph(fake)) == [frozenset(fake)]


def test_only_a_top_level_main_guard_is_left_out(tmp_path):
    # `python -m monet_fast.train.sft` runs the file as `__main__`: the CLI it imports there
    # imports a fresh `monet_fast.train.sft`, no cycle. Any other `if` (or a nested guard) counts.
    pkg = tmp_path / "monet_fast" / "data"
    pkg.mkdir(parents=True)
    a, b = pkg / "cyc_a.py", pkg / "cyc_b.py"
    a.write_text("def f():\n    from monet_fast.data import cyc_b\n")
    fake = {"monet_fast.data.cyc_a": a, "monet_fast.data.cyc_b": b}
    b.write_text('if __name__ == "__main__":\n    from monet_fast.data.cyc_a import f\n')
    assert cycles(import_graph(fake)) == []
    for counted in (
        'if __name__ != "__main__":\n    from monet_fast.data.cyc_a import f\n',
        'def g():\n    if __name__ == "__main__":\n        from monet_fast.data.cyc_a import f\n',
        'if __name__ == "__main__":\n    pass\nelse:\n    from monet_fast.data.cyc_a import f\n',
    ):
        b.write_text(counted)
        assert cycles(import_graph(fake)) == [frozenset(fake)], counted
