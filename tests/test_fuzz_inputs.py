"""Seeded fuzzing of every input reader (issue 14.4): mutated dataset rows, benchmark rows, RL
prompts and YAML configs may only fail with the documented error types -- `DataError` for data,
`ConfigError` for configs -- each naming its file, and the writer either writes everything or
nothing.

Mutations: drop / duplicate / retype fields, wrong placeholder and observation counts, hostile
image paths (absolute, `..`, symlinks, missing, empty, truncated, corrupt, bomb headers, NUL,
lone surrogates), truncated JSON/YAML, huge numbers, unicode, deeply nested garbage, unknown
config keys, garbage overrides. 1,000 cases by default (about 2 s); more with
`MONET_FUZZ_N=20000 MONET_FUZZ_SEED=1 pytest tests/test_fuzz_inputs.py`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import random
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from monet_fast.data import DataError, Segment, read_monet_sft
from monet_fast.data.writer import write_monet_sft
from monet_fast.eval.readers import read_benchmark
from monet_fast.model.tokens import LATENT_PLACEHOLDER as PH
from monet_fast.model.tokens import OBS_END, OBS_START
from monet_fast.train.config import ConfigError, load_config
from monet_fast.train.prompts import read_prompt_file
from monet_fast.train.vlpo_config import load_rl_config

N_CASES = int(os.environ.get("MONET_FUZZ_N", "1000"))
SEED = int(os.environ.get("MONET_FUZZ_SEED", "0"))
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Share of the cases per target (rows of each reader, then configs).
TARGETS = {
    "sft": 0.4,
    "prompts": 0.1,
    "vstar": 0.1,
    "mme": 0.1,
    "sft_config": 0.18,
    "rl_config": 0.12,
}

UNICODE = ["é", "\u200b", "\u202e", "😀", "\ud800", "\udfff", "\x00", "\n\t", "\ufeff", "𝔘"]


# ------------------------------------------------------------------------------------ fixtures


def _png_header(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A dataset root with tiny good images and every kind of bad one, plus a secret outside."""
    top = tmp_path_factory.mktemp("fuzz")
    root = top / "root"
    (root / "sub").mkdir(parents=True)
    for name in ("q.png", "crop.png", "sub/inner.png"):
        Image.new("RGB", (4, 4), (200, 30, 30)).save(root / name)
    Image.new("RGB", (4, 4)).save(top / "secret.png")
    (root / "empty.png").write_bytes(b"")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    full = (root / "q.png").read_bytes()
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    Image.new("I;16", (4, 4)).save(root / "deep.png")
    _png_header(root / "bomb.png", 10_000, 10_000)
    _png_header(root / "huge.png", 30_000, 30_000)
    (root / "link.png").symlink_to(top / "secret.png")
    (root / "dir.png").mkdir()
    return root


BAD_PATHS = [
    "missing.png", "empty.png", "corrupt.png", "truncated.png", "deep.png", "bomb.png",
    "huge.png", "link.png", "dir.png", "../secret.png", "sub/../../secret.png", "/etc/passwd",
    "C:\\x.png", "", " ", "a\x00b.png", "\ud800.png", "sub/../q.png", "sub/inner.png", "./q.png",
    "q.png" * 200,
]  # fmt: skip


# ------------------------------------------------------------------------------------ mutation


def _nodes(tree: Any, path: tuple = ()) -> list[tuple]:
    """Paths (tuples of keys/indices) of every node below the root."""
    out = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.append(path + (k,))
            out += _nodes(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.append(path + (i,))
            out += _nodes(v, path + (i,))
    return out


def _parent(tree: Any, path: tuple) -> Any:
    for key in path[:-1]:
        tree = tree[key]
    return tree


def _garbage(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(12)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 2**63, -(2**70), 10**400])
    if choice == 3:
        return rng.choice([0.5, -1e308, 1e-320, float("inf"), float("-inf"), float("nan")])
    if choice == 4:
        return "".join(rng.choice(UNICODE) for _ in range(rng.randrange(1, 5)))
    if choice == 5:
        return rng.choice([PH, OBS_START, OBS_END, "\\boxed{", "}", "\\boxed{}", PH * 3])
    if choice == 6:
        return rng.choice(BAD_PATHS)
    if choice == 7 and depth < 3:
        return [_garbage(rng, depth + 1) for _ in range(rng.randrange(3))]
    if choice == 8 and depth < 3:
        return {str(_garbage(rng, 3)): _garbage(rng, depth + 1) for _ in range(rng.randrange(3))}
    if choice == 9:
        nested: Any = "x"
        for _ in range(rng.choice([5, 50, 300])):
            nested = [nested] if rng.random() < 0.5 else {"k": nested}
        return nested
    return rng.choice(["", "text", "image", "user", "assistant", "system", "A", "(A) x"])


def _mutate_tree(tree: Any, rng: random.Random) -> Any:
    """One structural mutation of a decoded JSON/YAML value (in place where possible)."""
    nodes = _nodes(tree)
    if not nodes:
        return _garbage(rng)
    path = rng.choice(nodes)
    parent = _parent(tree, path)
    key = path[-1]
    op = rng.randrange(8)
    if op == 0:  # drop
        del parent[key]
    elif op == 1:  # duplicate
        if isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        else:
            parent[f"{key}"] = copy.deepcopy(parent[key])
            parent[f"{key}_copy"] = copy.deepcopy(parent[key])
    elif op == 2:  # retype
        parent[key] = _garbage(rng)
    elif op == 3:  # wrong counts of placeholders / observation tags in a string
        if isinstance(parent[key], str):
            parent[key] = rng.choice(
                [parent[key] + PH, parent[key].replace(PH, ""), parent[key] + OBS_START,
                 parent[key].replace(OBS_END, ""), OBS_END + parent[key], parent[key] * 3]
            )  # fmt: skip
        else:
            parent[key] = _garbage(rng)
    elif op == 4:  # hostile image path wherever a string sits
        parent[key] = rng.choice(BAD_PATHS)
    elif op == 5:  # unknown key
        if isinstance(parent, dict):
            parent[rng.choice(["unknown", "Data", "roles", "datta", "🙂", "1"])] = _garbage(rng)
        else:
            parent.append(_garbage(rng))
    elif op == 6:  # unicode
        parent[key] = (
            f"{parent[key]}{rng.choice(UNICODE)}" if isinstance(parent[key], str) else "\ud800"
        )
    else:  # nested garbage
        parent[key] = _garbage(rng, depth=0) if rng.random() < 0.5 else [[[[parent[key]]]]]
    return tree


def _mutate_text(text: str, rng: random.Random) -> str:
    """A text-level mutation: truncation, deletion, huge number or a broken byte sequence."""
    op = rng.randrange(5)
    cut = rng.randrange(len(text) + 1)
    if op == 0:
        return text[:cut]
    if op == 1:
        return text[:cut] + text[cut + rng.randrange(1, 20) :]
    if op == 2:
        return text[:cut] + "1" * 5000 + text[cut:]
    if op == 3:
        return (
            text[:cut]
            + rng.choice(['"\\ud800"', "NaN", "-Infinity", "[" * 2000, "\\", '"'])
            + text[cut:]
        )
    return text.replace('"', "'", 1)


def _mutations(base: Any, rng: random.Random, most: int = 3) -> Any:
    """A deep copy of `base` with 1..`most` tree mutations."""
    tree = copy.deepcopy(base)
    for _ in range(rng.randint(1, most)):
        tree = _mutate_tree(tree, rng)
    return tree


# --------------------------------------------------------------------------------------- bases


def _sft_row(sample_id: int) -> dict:
    return {
        "data": [
            {"role": "system", "content": [{"type": "text", "text": "s"}]},
            {
                "role": "user",
                "content": [{"type": "image", "image": "q.png"}, {"type": "text", "text": "Q?"}],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": f"zoom {PH}"},
                    {"type": "image", "image": "crop.png"},
                    {"type": "text", "text": f"{OBS_START}red{OBS_END} so \\boxed{{A}}"},
                ],
            },
        ],
        "metadata": {"dataset_name": "fz", "sample_id": sample_id, "choices": ["a", "b"]},
    }


PROMPT = {
    "question": "Which?",
    "image": ["q.png", "crop.png"],
    "answer": "B",
    "choices": ["x", "y"],
}
VSTAR = {
    "image": "q.png",
    "text": "What colour?\n(A) red\n(B) blue\nAnswer with the letter.",
    "category": "direct_attributes",
    "question_id": 0,
    "label": "A",
}
MME = {
    "Question_id": "perception/x/0",
    "Image": "q.png",
    "Text": "What colour?",
    "Answer choices": ["(A) red", "(B) blue"],
    "Ground truth": "B",
    "Category": "c",
    "Subtask": "s",
    "Task": "t",
}


def _serialise(value: Any, rng: random.Random, jsonl: bool) -> str:
    text = (
        "\n".join(json.dumps(r, allow_nan=True) for r in value)
        if jsonl and isinstance(value, list)
        else json.dumps(value, allow_nan=True)
    )
    return _mutate_text(text, rng) if rng.random() < 0.2 else text


# ------------------------------------------------------------------------------------- targets


class Outcome:
    """Counts per target and the unexpected failures (with a reproducer)."""

    def __init__(self) -> None:
        self.ok = 0
        self.expected = 0
        self.unexpected: list[str] = []
        self.writes = 0

    def run(self, case: str, fn: Callable[[], Any], allowed: type, need_file: bool = True) -> Any:
        try:
            result = fn()
        except allowed as err:
            self.expected += 1
            # Every error names where it comes from: the file (data) or file/key (configs).
            if need_file and isinstance(err, DataError) and err.file is None:
                self.unexpected.append(f"{case}: DataError without a file: {err}")
            return None
        except Exception as err:  # noqa: BLE001 -- the point of the test
            self.unexpected.append(f"{case}: {type(err).__name__}: {err!s:.300}")
            return None
        self.ok += 1
        return result


def _sft_case(world: Path, rng: random.Random, k: int, out: Outcome, scratch: Path) -> None:
    rows = [_sft_row(0), _sft_row(1)]
    rows[1] = _mutations(rows[1], rng)
    if rng.random() < 0.1:
        rows = _mutate_tree(rows, rng)
    jsonl = rng.random() < 0.3
    path = world / f"case{k}.{'jsonl' if jsonl else 'json'}"
    path.write_text(_serialise(rows, rng, jsonl), encoding="utf-8", errors="surrogatepass")
    on_error = rng.choice(["raise", "raise", "skip"])
    lazy = rng.random() < 0.3
    samples = out.run(
        f"sft {k} rows={rows!r:.400}",
        lambda: read_monet_sft(path, world, on_error=on_error, load_images=not lazy),
        DataError,
    )
    path.unlink()
    _check_confined(f"sft {k}", samples, world, out)
    if samples and k % 7 == 0:
        _write_case(samples, rng, k, out, scratch)


def _check_confined(case: str, samples, root: Path, out: Outcome) -> None:
    """Invariant: whatever was read only names image files inside the dataset root."""
    real_root = os.path.realpath(root)
    for sample in samples or []:
        for seg in sample.question + sample.reasoning:
            if seg.path is not None and not os.path.realpath(seg.path).startswith(
                real_root + os.sep
            ):
                out.unexpected.append(f"{case}: image {seg.path!r} outside the root was read")


def _write_case(samples, rng: random.Random, k: int, out: Outcome, scratch: Path) -> None:
    """Write what was read (sometimes spoiled): all files appear, or none."""
    target = scratch / f"out{k}"
    spoil = rng.randrange(3)
    if spoil == 1:
        samples[-1].question.insert(0, Segment("image", path=str(target.parent / "nope.png")))
    elif spoil == 2:
        samples[-1].question.append(Segment("text", rng.choice([PH, OBS_START, OBS_END])))
    path = out.run(f"write {k}", lambda: write_monet_sft(samples, target), DataError, False)
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.exists() else []
    if path is None and files:
        out.unexpected.append(f"write {k}: failed but left {files}")
    if path is not None:
        out.writes += 1
        back = out.run(f"reread {k}", lambda: read_monet_sft(path), DataError)
        if back is None or len(back) != len(samples):
            out.unexpected.append(f"write {k}: written file does not read back")


def _prompt_case(world: Path, rng: random.Random, k: int, out: Outcome) -> None:
    rows = _mutations([PROMPT, dict(PROMPT, id="x")], rng)
    path = world / f"prompts{k}.jsonl"
    path.write_text(_serialise(rows, rng, True), encoding="utf-8", errors="surrogatepass")
    on_error = rng.choice(["raise", "skip"])
    got = out.run(
        f"prompts {k} rows={rows!r:.400}",
        lambda: read_prompt_file(str(path), on_error=on_error),
        DataError,
    )
    _check_confined(f"prompts {k}", got[0] if got else None, world, out)
    path.unlink()


def _bench_case(world: Path, rng: random.Random, k: int, out: Outcome, name: str) -> None:
    folder = world / f"{name}{k}"
    folder.mkdir()
    if name == "vstar":
        rows = _mutations([VSTAR, dict(VSTAR, question_id=1)], rng)
        file = folder / "test_questions.jsonl"
        file.write_text(_serialise(rows, rng, True), encoding="utf-8", errors="surrogatepass")
        bench = "vstar"
    else:
        rows = _mutations([MME, dict(MME, Question_id="perception/x/1")], rng)
        file = folder / "MME-RealWorld-Lite.json"
        file.write_text(_serialise(rows, rng, False), encoding="utf-8", errors="surrogatepass")
        bench = "mme-realworld-lite"
    for image in ("q.png", "crop.png", "bomb.png", "truncated.png"):
        (folder / image).write_bytes((world / image).read_bytes())
    load = rng.random() < 0.5
    got = out.run(
        f"{bench} {k} rows={rows!r:.400}",
        lambda: read_benchmark(bench, folder, load_images=load),
        DataError,
    )
    _check_confined(f"{bench} {k}", got, folder, out)
    for p in sorted(folder.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    folder.rmdir()


def _override(rng: random.Random) -> str:
    key = rng.choice(
        ["optim.lr", "data.n", "data", "trainer.max_steps", "model.latent_size", "stage",
         "data.allow_outside_root", "teacher.layers", "deepspeed.extra", "a.b.c", "optim.betas",
         "rollout.top_p", "filter.acc_high", "", "data..n", "reward.functions"]
    )  # fmt: skip
    value = rng.choice(
        ["1", "-1", "0", "1e999", ".nan", "[1, 2", "{a: 1}", "true", "'x'", "", "~", "1" * 5000,
         "[[[[[[[]]]]]]]", "\ud800", "[{name: x}]", "2.5", "all"]
    )  # fmt: skip
    return rng.choice([f"{key}={value}", key, f"={value}"])


@functools.cache
def _base_config(rl: bool) -> dict:
    """A shipped tiny config (parsed once), its DeepSpeed JSON made absolute."""
    base = yaml.safe_load((CONFIGS / "tiny" / ("vlpo.yaml" if rl else "stage2.yaml")).read_text())
    base["deepspeed"] = {"config": str(CONFIGS / "deepspeed" / "zero2.json")}
    return base


def _config_case(world: Path, rng: random.Random, k: int, out: Outcome, rl: bool) -> None:
    tree = _mutations(_base_config(rl), rng, most=2)
    try:
        # libyaml's dumper when present: the pure-Python one would dominate the test's time.
        text = yaml.dump(tree, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper))
    except (yaml.YAMLError, UnicodeEncodeError):
        text = json.dumps(tree)
    except RecursionError:  # the dumper's own limit: send the parser a deep text instead
        text = "data: " + "[" * 5000  # JSON is YAML; surrogates stay escaped
    if rng.random() < 0.15:
        text = _mutate_text(text, rng)
    path = world / f"config{k}.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    overrides = [_override(rng) for _ in range(rng.choice([0, 0, 0, 1, 2]))]
    load = (
        (lambda: load_rl_config(path, overrides)) if rl else (lambda: load_config(path, overrides))
    )
    out.run(f"{'rl' if rl else 'sft'} config {k} {text!r:.300} {overrides}", load, ConfigError)
    path.unlink()


# ------------------------------------------------------------------------------------- the test


@pytest.mark.filterwarnings("ignore::monet_fast.data.DataWarning")  # skip mode warns by design
def test_fuzzed_inputs_fail_only_with_documented_errors(world, tmp_path):
    rng = random.Random(SEED)
    outcomes = {name: Outcome() for name in TARGETS}
    counts = {name: max(1, round(N_CASES * share)) for name, share in TARGETS.items()}
    for name, n in counts.items():
        out = outcomes[name]
        for k in range(n):
            if name == "sft":
                _sft_case(world, rng, k, out, tmp_path)
            elif name == "prompts":
                _prompt_case(world, rng, k, out)
            elif name in ("vstar", "mme"):
                _bench_case(world, rng, k, out, name)
            else:
                _config_case(world, rng, k, out, rl=name == "rl_config")
    unexpected = [u for out in outcomes.values() for u in out.unexpected]
    summary = {n: (o.ok, o.expected, len(o.unexpected)) for n, o in outcomes.items()}
    assert not unexpected, f"{len(unexpected)} unexpected failures {summary}:\n" + "\n".join(
        unexpected[:8]
    )
    # The fuzz must exercise both sides: inputs that pass and inputs that are refused.
    for name, out in outcomes.items():
        assert out.expected > 0, f"{name}: no mutation was refused {summary}"
        assert out.ok > 0, f"{name}: every mutation was refused {summary}"
    assert outcomes["sft"].writes > 0
    assert not list(world.glob("*.tmp")) and not list(tmp_path.rglob("*.tmp"))
