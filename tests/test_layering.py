"""The package layering, read from the source with `ast` (no import needed, so it runs in ~0.1 s).

Data flows one way: base helpers -> data -> model/kernels -> decode -> tasks -> eval | train ->
applications (bench, demo, serve) -> cli. A module may import its own package and any strictly
lower layer; never a higher one, nor a sibling package of its own layer (train/ and eval/ both
build on tasks/, neither imports the other) -- lazy imports inside functions included, because
they are dependencies all the same. Imports under `if TYPE_CHECKING:` or `if __name__ == "__main__":` do not count.
On top of that, module-level (import-time) imports must not form a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower number = lower layer. Top-level modules (monet_fast/foo.py) are listed by name.
LAYERS: dict[str, int] = {
    "": 0,  # monet_fast/__init__.py
    "_compat": 0,
    "_ext": 0,
    "_io": 0,
    "_lazy": 0,
    "_ops": 0,
    "_optional": 0,
    "latent_mask": 0,
    "stage": 0,
    "env_info": 0,
    "data": 1,
    "model": 2,
    "kernels": 2,
    "decode": 3,
    "tasks": 4,
    "eval": 5,
    "train": 5,
    "bench": 6,
    "demo": 6,
    "serve": 6,
    "kernel_check": 6,
    "cli": 7,
}

# The upward imports that are allowed, each with its reason: (importer prefix, imported prefix).
EXCEPTIONS: dict[tuple[str, str], str] = {
    # The special-token vocabulary is plain string constants that readers/writers validate
    # against; it has no model code.
    ("monet_fast.data", "monet_fast.model.tokens"): "token vocabulary constants",
    # Collate lays tokens out the way the model reads them (model.sequence); it is the one data
    # module that sits above model/, and nothing in model/ imports it at run time.
    ("monet_fast.data.batching", "monet_fast.model"): "collate builds the model's token layout",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "kernels":  # installed as monet_fast.kernels (pyproject package-dir)
        parts = ["monet_fast", "kernels", *rel.with_suffix("").parts[1:]]
    else:
        parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    paths = [*ROOT.glob("monet_fast/**/*.py"), *ROOT.glob("kernels/**/*.py")]
    return {_module_name(p): p for p in sorted(paths)}


# Top-level modules that are part of another top-level unit (split out of it for size).
PART_OF: dict[str, str] = {"demo_summary": "demo"}


def _layer_key(module: str) -> str:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else ""
    return PART_OF.get(key, key)


def _skipped_block(node: ast.If) -> bool:
    test = ast.unparse(node.test)
    return test in ("TYPE_CHECKING", "typing.TYPE_CHECKING") or "__name__" in test


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at import time) for each monet_fast import of one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _skipped_block(child):
                for sub in child.orelse:
                    visit(sub, top)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".")
                    base = base[: len(base) - child.level + (1 if is_package else 0)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append((target, child.lineno, top))
                # `from monet_fast.x import y` may import the submodule monet_fast.x.y.
                found.extend((f"{target}.{a.name}", child.lineno, top) for a in child.names)
            inner = top and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            visit(child, inner)

    visit(tree, True)
    return [(name, line, top) for name, line, top in found if name.split(".")[0] == "monet_fast"]


SOURCES = _sources()


def _resolve(name: str, sources: dict[str, Path]) -> str | None:
    """The source module an import names (the longest known prefix), or None (an attribute)."""
    while name and name not in sources:
        name = name.rpartition(".")[0]
    return name or None


def layering_violations(sources: dict[str, Path] = SOURCES) -> list[str]:
    problems = []
    for module, path in sources.items():
        key = _layer_key(module)
        if key not in LAYERS:
            problems.append(f"{path}: package {key!r} has no layer in tests/test_layering.py")
            continue
        for name, line, _ in _imports(module, path):
            target = _resolve(name, sources)
            if target is None:
                continue
            tkey = _layer_key(target)
            tlayer = LAYERS.get(tkey, 99)
            if tkey == key or tlayer < LAYERS[key] or tlayer == LAYERS[key] == 0:
                continue
            if any(
                (module + ".").startswith(a + ".") and (target + ".").startswith(b + ".")
                for a, b in EXCEPTIONS
            ):
                continue
            problems.append(
                f"{path}:{line}: {module} (layer {key!r}) imports {target} (package {tkey!r}, not below it)"
            )
    return sorted(set(problems))


def import_cycles(sources: dict[str, Path] = SOURCES) -> list[list[str]]:
    """Cycles among import-time imports (a package's __init__ counts as the package)."""
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, path in sources.items():
        for name, _, top in _imports(module, path):
            target = _resolve(name, sources)
            if top and target is not None and target != module:
                graph[module].add(target)
    cycles, state, stack = [], {}, []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            dfs(module)
    return cycles


def test_every_import_respects_the_layers():
    assert SOURCES, "no sources found"
    problems = layering_violations()
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_train_never_imports_eval():
    # The rule that motivated the layering, checked on its own so its failure reads plainly.
    bad = [
        f"{module}: {name}"
        for module, path in SOURCES.items()
        if module.startswith("monet_fast.train")
        for name, _, _ in _imports(module, path)
        if name.startswith("monet_fast.eval")
    ]
    assert not bad


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("monet_fast.train.x", "from monet_fast.eval.scoring import f\n", "package 'eval'"),
        ("monet_fast.model.x", "def f():\n    from monet_fast.decode import g\n", "'decode'"),
        ("monet_fast.data.x", "from ..train import loop\n", "package 'train'"),
    ],
)
def test_the_checker_catches_an_upward_import(tmp_path, module, source, expected):
    path = tmp_path / "x.py"
    path.write_text(source)
    fake = {**SOURCES, module: path}
    problems = [p for p in layering_violations(fake) if str(path) in p]
    assert any(expected in p for p in problems), problems


def test_the_checker_catches_a_cycle(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from monet_fast.data.cyc_b import x\n")
    b.write_text("import monet_fast.data.cyc_a\n")
    fake = {**SOURCES, "monet_fast.data.cyc_a": a, "monet_fast.data.cyc_b": b}
    cycles = import_cycles(fake)
    assert any("monet_fast.data.cyc_a" in c and "monet_fast.data.cyc_b" in c for c in cycles)
