"""Write pip constraints that fit the torch installed in this interpreter.

constraints.txt is the one place versions are pinned, but one Triton pin cannot fit every torch:
the PyPI CUDA build `torch==2.13.0` (+cu130) requires `triton==3.7.1`, while the CPU build
`2.13.0+cpu` requires no Triton and pairs with the `triton==3.8.0` pinned there; with a single
pin, `pip install -c constraints.txt` fails with ResolutionImpossible on one of the two. This
copies constraints.txt with

  * the pin of each package the installed torch requires with an exact version (`triton`)
    replaced by torch's own requirement, read from its metadata;
  * the torch pin replaced by the installed torch, so that pip keeps it instead of fetching the
    pinned build (several GB for a CUDA one).

Where torch requires no Triton (its CPU build) constraints.txt's pin stays. Run it with the
interpreter of the target environment, after torch is installed; standard library only:

    .venv/bin/python tools/constraints_for_torch.py -o .venv/constraints.txt
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Packages whose pin follows the installed torch's own requirement.
FOLLOW_TORCH = ("triton",)
_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)")


def normalise(name: str) -> str:
    """PEP 503 name: `Triton_Kernels` and `triton-kernels` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _marker_applies(marker: str) -> bool:
    """Evaluate an environment marker here; an extra-only requirement does not apply."""
    if not marker:
        return True
    if "extra" in marker:  # `triton; extra == "..."`: not a plain dependency of torch
        return False
    try:
        from packaging.markers import Marker
    except ImportError:
        try:  # a fresh venv with only torch has no `packaging`, but pip vendors it
            from pip._vendor.packaging.markers import Marker
        except ImportError:
            return True  # cannot evaluate: torch's triton markers name Linux, where it matters
    return Marker(marker).evaluate()


def torch_pins(requirements: list[str] | None, follow: tuple[str, ...] = FOLLOW_TORCH) -> dict:
    """{normalised name: constraint line} for each package in `follow` that `requirements`
    (torch's metadata, `importlib.metadata.requires("torch")`) pins with `==` on this platform."""
    wanted = {normalise(n) for n in follow}
    pins: dict[str, str] = {}
    for req in requirements or []:
        spec, _, marker = req.partition(";")
        match = _REQUIREMENT.fullmatch(spec)
        if match is None:
            continue
        name = normalise(match.group(1))
        version = match.group(2).strip().strip("()").strip()
        if name in wanted and version.startswith("==") and _marker_applies(marker.strip()):
            pins[name] = f"{match.group(1)}{version}"
    return pins


def effective_constraints(text: str, pins: dict[str, str]) -> tuple[str, list[str]]:
    """constraints.txt `text` with the lines of the packages in `pins` replaced (or appended when
    constraints.txt has none). Returns the new text and one line per change, for the log."""
    out, changes, done = [], [], set()
    for line in text.splitlines():
        match = _REQUIREMENT.match(line.split("#", 1)[0])
        name = normalise(match.group(1)) if match and match.group(1) else None
        if name in pins:
            done.add(name)
            old = line.split("#", 1)[0].strip()
            if old != pins[name]:
                changes.append(f"{old} -> {pins[name]}")
            line = pins[name]
        out.append(line)
    for name in sorted(set(pins) - done):
        out.append(pins[name])
        changes.append(f"+ {pins[name]}")
    return "\n".join(out) + "\n", changes


def installed_torch_pins() -> dict[str, str]:
    """The pins that follow the torch installed in this interpreter (itself included)."""
    version = importlib.metadata.version("torch")
    pins = torch_pins(importlib.metadata.requires("torch"))
    pins["torch"] = f"torch=={version}"
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    parser.add_argument("-o", "--output", type=Path, help="write here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        pins = installed_torch_pins()
    except importlib.metadata.PackageNotFoundError:
        print(
            f"error: torch is not installed for {sys.executable}; install it first "
            "(pip install torch==<version>+cpu, or your CUDA build of torch)",
            file=sys.stderr,
        )
        return 2
    text, changes = effective_constraints(args.constraints.read_text(), pins)
    for change in changes or ["no change"]:
        print(f"[constraints for {pins['torch']}] {change}", file=sys.stderr)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
