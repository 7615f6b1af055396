"""Teacher targets for SFT stages 2 and 3: computed online by a frozen model, or cached on disk.

* Stage 2 aligns the student's observation-token states to the STAGE-1 model's all-layer hidden
  states at the same observation tokens, computed on the stage-1 sequence (auxiliary images
  visible): per sample `[n_layers+1, n_obs, hidden]`.
* Stage 3 aligns the student's latent-slot states to the STAGE-2 model's latent trajectories
  (all-layer states at its latent slots, stage-2 sequence with K slots): `[n_layers+1, n_slots,
  hidden]`.

`OnlineTeacher` runs the frozen teacher on the same samples as the student batch.
`TeacherCache` reads targets precomputed once by `precompute_teacher_cache` into one indexed
store: a directory of safetensors shards (tensors named by sample key) plus `cache.json` (what
was cached, by which teacher, layer subset, dtype) and `index.json` (key -> shard, fingerprint).
The reference writes one `.pt` per sample with all 29 layers in bf16 (REFERENCE.md §3.1, §4.1);
a layer subset and fewer files make the cache smaller and faster to open.

Safety: every entry carries a fingerprint of the sample it was computed from (texts, image paths
or pixels), checked on read, so a cache built from a different dataset version cannot be used
silently; a cache built by another teacher / layer subset / dtype / K is refused as a whole.
Precompute is resumable: finished shards are kept, a shard is written to a temp file and renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from monet_fast._io import atomic_write_text, temp_sibling
from monet_fast.data.batching import collate
from monet_fast.data.types import Sample
from monet_fast.stage import Stage

logger = logging.getLogger(__name__)

# Student stage -> (teacher sequence stage, which states are the targets).
TARGET_KIND: dict[int, str] = {2: "observation_states", 3: "latent_trajectories"}

CACHE_FORMAT = "monet_fast.teacher_cache"
CACHE_VERSION = 1
HEADER_FILE = "cache.json"
INDEX_FILE = "index.json"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class MissingTeacherEntry(KeyError, ValueError):
    """A sample has no entry in the teacher cache (the message says how to fill it).

    Also a ValueError, so command-line front ends report it as a usage error, not a crash."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------
# Identity helpers
# --------------------------------------------------------------------------------------------


def sample_fingerprint(sample: Sample) -> str:
    """A short hash of what a teacher target depends on: texts, images (path or pixels), K-free.

    Images read lazily are identified by path (hashing pixels would decode every image again);
    in-memory images by their pixels.
    """
    h = hashlib.sha256()
    h.update(sample.system.encode())
    for part, segs in (("q", sample.question), ("r", sample.reasoning)):
        for seg in segs:
            h.update(f"|{part}:{seg.kind}:".encode())
            h.update(seg.text.encode())
            if seg.kind in ("image", "aux_image"):
                if seg.path is not None:
                    h.update(f"path:{seg.path}".encode())
                else:
                    img = seg.image
                    h.update(f"px:{img.mode}:{img.size}".encode())
                    h.update(img.tobytes())
    return h.hexdigest()[:16]


def model_identity(model: Any, path: str | os.PathLike | None) -> str:
    """A string naming the teacher weights: path + a digest that changes when they do.

    From a directory: config.json plus size and first/last MiB of every weight file (cheap even
    for 7B, and catches a retrained model written to the same path). Without a path: a digest
    of all parameters (meant for the small in-memory test models).
    """
    h = hashlib.sha256()
    if path is not None:
        p = Path(path).resolve()
        for f in sorted(p.iterdir()):
            if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin")):
                size = f.stat().st_size
                h.update(f"{f.name}:{size}".encode())
                with open(f, "rb") as fh:
                    h.update(fh.read(1 << 20))
                    if size > 2 << 20:
                        fh.seek(-(1 << 20), os.SEEK_END)
                        h.update(fh.read())
        return f"{p}#{h.hexdigest()[:16]}"
    for name, param in model.state_dict().items():
        h.update(name.encode())
        h.update(param.detach().to("cpu", torch.float32).numpy().tobytes())
    return f"in-memory#{h.hexdigest()[:16]}"


def resolve_layers(layers: str | Sequence[int] | None, n_states: int) -> list[int] | None:
    """Normalise a layer selection to sorted unique indices into the n_states hidden states.

    "all"/None -> None (every state). Negative indices count from the end (-1 = final norm).
    """
    if layers is None or layers == "all":
        return None
    out = set()
    for i in layers:
        j = i + n_states if i < 0 else i
        if not 0 <= j < n_states:
            raise ValueError(
                f"teacher.layers index {i} is out of range: the model has {n_states} hidden "
                f"states (0 = embeddings, {n_states - 1} = final norm output)"
            )
        out.add(j)
    result = sorted(out)
    return None if result == list(range(n_states)) else result


# --------------------------------------------------------------------------------------------
# Computing targets
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_teacher_states(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    student_stage: Stage,
    latent_size: int,
    layers: list[int] | None = None,
) -> list[torch.Tensor]:
    """The teacher targets of `samples` for a stage-2 or stage-3 student, one tensor per sample.

    no_grad rather than inference_mode: the targets enter the student's autograd graph as
    constants, and inference tensors cannot be saved for backward.
    """
    from monet_fast.model.latent import latent_forward

    teacher_stage = Stage.expect(student_stage, "compute_teacher_states(student_stage)").teacher
    if teacher_stage is None:
        raise ValueError(f"teacher targets exist for stages 2 and 3, got stage {student_stage}")
    batch = collate(samples, processor, teacher_stage, latent_size)
    out = latent_forward(model, batch, return_states=True)
    states = out.obs_states if teacher_stage is Stage.STAGE1 else out.slot_states
    if layers is not None:
        states = [s[layers] for s in states]
    return states


class OnlineTeacher:
    """A frozen teacher model that computes targets for each student batch."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        student_stage: Stage,
        latent_size: int,
        layers: list[int] | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.student_stage = Stage.expect(student_stage, "OnlineTeacher(student_stage)")
        self.latent_size = latent_size
        self.layers = layers

    def __call__(self, samples: Sequence[Sample]) -> list[torch.Tensor]:
        return compute_teacher_states(
            self.model,
            self.processor,
            samples,
            self.student_stage,
            self.latent_size,
            self.layers,
        )


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


@dataclass
class CacheHeader:
    """What a cache holds; two caches are interchangeable iff their headers are equal."""

    student_stage: int
    kind: str
    teacher: str
    layers: list[int] | None
    n_states: int
    hidden_size: int
    dtype: str
    latent_size: int
    image_budget: list[int] | None = None
    format: str = CACHE_FORMAT
    version: int = CACHE_VERSION

    @property
    def stage(self) -> Stage:
        """The student stage as a `Stage` (the header stores its number: a JSON file field)."""
        return Stage.of(self.student_stage)

    def describe_difference(self, other: CacheHeader) -> str:
        a, b = asdict(self), asdict(other)
        return ", ".join(f"{k}: cache has {a[k]!r}, run wants {b[k]!r}" for k in a if a[k] != b[k])


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _shard_metadata(path: Path) -> dict | None:
    """The (keys, fingerprints) metadata of a complete shard, or None if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return {"keys": json.loads(meta["keys"]), "fingerprints": json.loads(meta["fingerprints"])}
    except Exception:  # truncated / foreign file: recompute the shard
        return None


@dataclass
class CacheReport:
    """What a precompute did and how big the cache is."""

    cache_dir: str
    n_samples: int
    shards_total: int
    shards_computed: int
    shards_reused: int
    total_bytes: int

    @property
    def bytes_per_sample(self) -> float:
        return self.total_bytes / max(self.n_samples, 1)

    def summary(self) -> str:
        return (
            f"teacher cache {self.cache_dir}: {self.n_samples} samples in {self.shards_total} "
            f"shards ({self.shards_computed} computed, {self.shards_reused} reused), "
            f"{self.total_bytes / 2**20:.2f} MiB, {self.bytes_per_sample / 2**10:.1f} KiB/sample"
        )


def _check_unique_keys(samples: Sequence[Sample]) -> None:
    seen: dict[str, int] = {}
    for i, s in enumerate(samples):
        if s.key in seen:
            raise ValueError(
                f"samples {seen[s.key]} and {i} share the key {s.key!r} (dataset_name_sample_id); "
                "the teacher cache needs unique keys"
            )
        seen[s.key] = i


def open_or_create_header(cache_dir: Path, header: CacheHeader) -> None:
    """Write cache.json, or check that an existing one matches `header` exactly."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / HEADER_FILE
    if path.is_file():
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw.pop("bytes_per_sample", None)
        raw.pop("total_bytes", None)
        raw.pop("n_samples", None)
        try:
            existing = CacheHeader(**raw)
        except TypeError as err:
            raise ValueError(f"{path} is not a monet_fast teacher cache header: {err}") from err
        if existing != header:
            raise ValueError(
                f"the teacher cache in {cache_dir} was built differently "
                f"({existing.describe_difference(header)}); delete it or set teacher.cache_dir "
                "to another directory"
            )
        return
    atomic_write_text(path, json.dumps(asdict(header), indent=2))


def precompute_teacher_cache(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    cache_dir: str | os.PathLike,
    header: CacheHeader,
    *,
    batch_size: int = 4,
    shard_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    prepare: Callable[[Sample], Sample] | None = None,
) -> CacheReport:
    """Compute the teacher targets of `samples` into `cache_dir` (resumable, rank-sharded).

    Shard i holds samples [i·shard_size, (i+1)·shard_size) in dataset order; rank r computes
    shards r, r+W, ... A shard whose file already lists exactly these samples (keys and
    fingerprints) is reused. `prepare` (e.g. image-budget resizing) is applied to a sample
    before the teacher sees it; keys and fingerprints are those of the original. Call
    `finalize_cache` on rank 0 after all ranks are done (the
    recipe puts a barrier in between). Needs `cache.json` (`open_or_create_header`) first.
    """
    from safetensors.torch import save_file

    _check_unique_keys(samples)
    cache_dir = Path(cache_dir)
    dtype = _DTYPES[header.dtype]
    n_shards = -(-len(samples) // shard_size)
    mine = list(range(rank, n_shards, world_size))
    computed = reused = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"teacher cache (stage {header.student_stage})")
    for i in mine:
        chunk = samples[i * shard_size : (i + 1) * shard_size]
        keys = [s.key for s in chunk]
        fps = [sample_fingerprint(s) for s in chunk]
        path = cache_dir / _shard_name(i)
        meta = _shard_metadata(path) if path.is_file() else None
        if meta is not None and meta["keys"] == keys and meta["fingerprints"] == fps:
            reused += 1
        else:
            tensors: dict[str, torch.Tensor] = {}
            for j in range(0, len(chunk), batch_size):
                part = chunk[j : j + batch_size]
                seen = [prepare(s) for s in part] if prepare is not None else part
                states = compute_teacher_states(
                    model, processor, seen, header.stage, header.latent_size, header.layers
                )
                for s, st in zip(part, states):
                    tensors[s.key] = st.to("cpu", dtype).contiguous()
            tmp = temp_sibling(path)
            try:
                save_file(
                    tensors,
                    tmp,
                    metadata={"keys": json.dumps(keys), "fingerprints": json.dumps(fps)},
                )
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            computed += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    total = sum((cache_dir / _shard_name(i)).stat().st_size for i in mine)
    return CacheReport(str(cache_dir), len(samples), n_shards, computed, reused, total)


def finalize_cache(
    cache_dir: str | os.PathLike, samples: Sequence[Sample], shard_size: int
) -> CacheReport:
    """Write index.json for the shards covering `samples` and the size figures in cache.json."""
    from safetensors import safe_open

    cache_dir = Path(cache_dir)
    n_shards = -(-len(samples) // shard_size)
    index: dict[str, list] = {}
    total = 0
    for i in range(n_shards):
        path = cache_dir / _shard_name(i)
        meta = _shard_metadata(path) if path.is_file() else None
        if meta is None:
            raise MissingTeacherEntry(f"teacher cache shard {path} is missing or unreadable")
        with safe_open(str(path), framework="pt") as f:
            for key, fp in zip(meta["keys"], meta["fingerprints"]):
                index[key] = [path.name, fp, list(f.get_slice(key).get_shape())]
        total += path.stat().st_size
    atomic_write_text(cache_dir / INDEX_FILE, json.dumps(index))
    header = json.loads((cache_dir / HEADER_FILE).read_text(encoding="utf-8"))
    header.update(
        n_samples=len(samples), total_bytes=total, bytes_per_sample=total / max(len(samples), 1)
    )
    atomic_write_text(cache_dir / HEADER_FILE, json.dumps(header, indent=2))
    return CacheReport(str(cache_dir), len(samples), n_shards, 0, n_shards, total)


class TeacherCache:
    """Read-only access to a finished teacher cache; `cache(samples)` -> list of target tensors.

    Shard files are opened lazily (memory-mapped by safetensors) and not pickled, so a cache
    object can be handed to DataLoader workers.
    """

    def __init__(self, cache_dir: str | os.PathLike, expect: CacheHeader | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        header_path = self.cache_dir / HEADER_FILE
        index_path = self.cache_dir / INDEX_FILE
        if not header_path.is_file() or not index_path.is_file():
            raise FileNotFoundError(
                f"no finished teacher cache in {str(self.cache_dir)!r} (missing {HEADER_FILE} or "
                f"{INDEX_FILE}); build it with teacher.precompute=auto or `monet-fast train ... "
                "--precompute-teacher`"
            )
        raw = json.loads(header_path.read_text(encoding="utf-8"))
        self.total_bytes = int(raw.pop("total_bytes", 0))
        self.bytes_per_sample = float(raw.pop("bytes_per_sample", 0.0))
        raw.pop("n_samples", None)
        self.header = CacheHeader(**raw)
        if expect is not None and expect != self.header:
            raise ValueError(
                f"the teacher cache in {self.cache_dir} was built differently "
                f"({self.header.describe_difference(expect)})"
            )
        self.index: dict[str, list] = json.loads(index_path.read_text(encoding="utf-8"))
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return len(self.index)

    def missing(self, samples: Sequence[Sample]) -> list[str]:
        """Keys of samples with no entry, or an entry computed from a different sample."""
        out = []
        for s in samples:
            entry = self.index.get(s.key)
            if entry is None or entry[1] != sample_fingerprint(s):
                out.append(s.key)
        return out

    def get(self, sample: Sample) -> torch.Tensor:
        """The cached target of `sample`, after checking it was computed from this sample."""
        from safetensors import safe_open

        entry = self.index.get(sample.key)
        if entry is None:
            raise MissingTeacherEntry(
                f"sample {sample.key!r} ({sample.source or 'in memory'}) has no entry in the "
                f"teacher cache {self.cache_dir}; rebuild it for this dataset "
                "(teacher.precompute=auto fills missing entries)"
            )
        shard, fp, _ = entry
        actual = sample_fingerprint(sample)
        if fp != actual:
            raise ValueError(
                f"teacher cache entry for {sample.key!r} was computed from a different sample "
                f"(fingerprint {fp}, this sample {actual}): the dataset changed since the cache "
                "was built; rebuild it"
            )
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(self.cache_dir / shard), framework="pt")
        return handle.get_tensor(sample.key)

    def __call__(self, samples: Sequence[Sample]) -> list[torch.Tensor]:
        return [self.get(s) for s in samples]


__all__ = [
    "CacheHeader",
    "CacheReport",
    "MissingTeacherEntry",
    "OnlineTeacher",
    "TARGET_KIND",
    "TeacherCache",
    "compute_teacher_states",
    "finalize_cache",
    "model_identity",
    "open_or_create_header",
    "precompute_teacher_cache",
    "resolve_layers",
    "sample_fingerprint",
]
