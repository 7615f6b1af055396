"""Tile shapes of the Triton kernels, in one table keyed on (kernel, dtype, head_dim bucket, arch).

Every launcher asks `tile_config` (or `row_launch` for the row-streaming log-prob kernels) for its
block sizes, warps and pipeline stages, and `monet-fast check-kernels` compiles exactly those
choices for each GPU target, so the table below is what has been checked to fit.

Shared-memory budget. With aligned inputs Triton stages the operand tiles of every `tl.dot`
in shared memory with cp.async, one buffer per pipeline stage: a latent-attention pass needs
about num_stages x (the two streamed tiles, BLOCK_N x BLOCK_D each) + the resident BLOCK_M x
BLOCK_D tiles, times the dtype's size (fp32 twice the 16-bit bytes), plus layout scratch. A
block may use at most the arch's opt-in maximum (`SHARED_LIMITS`, CUDA occupancy tables):
sm_80 163 KB, sm_86 / sm_89 99 KB, sm_90 227 KB. Measured by `monet-fast check-kernels`
(Triton 3.8): the tuned 16-bit tiles (128 x 64, 3 stages) need up to 130 KB at head_dim 128
on sm_90 and 105 KB (dK/dV) on sm_80 / sm_89, too much for sm_86 / sm_89, which get smaller
tiles; fp32 with those tiles needs about twice as much (227 KB at head_dim 128 and 130 KB at
64 even without alignment hints; its ieee dots run on FMA units and spill), so fp32 uses
32 x 32 tiles on every arch (48-68 KB).
head_dim 80 / 96 use BLOCK_D = 128 with masking (tl.arange needs a power of two), and
head_dim < 16 is zero-padded to BLOCK_D = 16 because tl.dot needs K >= 16.

Arch families: the table is keyed on the smallest budget class an arch falls in ("sm80",
"sm86" for sm_86 / sm_89 / sm_120, "sm90" for sm_90 / sm_100), plus "interpreter" (the CPU
interpreter, whose cost grows with programs x loop iterations: big tiles run fastest).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

# Max dynamic shared memory per block (opt-in), bytes, by compute capability (CUDA occupancy
# calculator): 163 KB on sm_80 / sm_87, 99 KB on sm_86 / sm_89 / sm_120, 227 KB on sm_90 / sm_100.
SHARED_LIMITS: dict[int, int] = {
    80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 103: 232448,
    120: 101376, 121: 101376,
}  # fmt: skip
INTERPRETER = "interpreter"
KERNELS = ("latent_attention", "gaussian_logprob")
DTYPES = ("bf16", "fp16", "fp32")
MAX_HEAD_DIM = 256
MIN_BLOCK_D = 16  # tl.dot needs K >= 16: smaller head dims are zero-padded to 16 (masked loads)


@dataclass(frozen=True)
class BlockConfig:
    """Tile shapes and launch knobs of the latent-attention forward, dK/dV and dQ passes.

    16-bit defaults (D = 128, sm_90) picked from `ptxas -v` on the compiled kernels, not yet
    from GPU timings: forward 128 x 64 with 8 warps spills 4 bytes (128 x 128: 180); dK/dV
    64 x 64 spills ~100 bytes (the tutorial's 32 x 128: 300); dQ 128 x 32 spills none.
    """

    fwd_m: int = 128
    fwd_n: int = 64
    dkdv_m: int = 64
    dkdv_n: int = 64
    dq_m: int = 128
    dq_n: int = 32
    num_warps: int = 8
    num_stages: int = 3


@dataclass(frozen=True)
class RowTiles:
    """Launch knobs of the row-streaming log-prob kernels: a program reads at most
    `max_elems` elements per loop step, BLOCK_D columns wide (BLOCK_ROWS = max_elems // BLOCK_D
    rows, fewer when there are fewer rows)."""

    block_d: int
    max_elems: int


# 16-bit latent attention. With aligned inputs Triton pipelines the K / V (or Q / dO) tiles
# through shared memory with cp.async, one buffer per stage: the tuned sm_90 defaults need
# 130 KB at D = 128 on sm_90 and 105 KB on sm_80 / sm_89, which sm_80 (163 KB) and sm_90
# (227 KB) have and sm_86 / sm_89 (99 KB) do not, so the sm86 family gets 64-row tiles,
# 4 warps and 2 stages (57 KB).
_SMALL_16 = BlockConfig(64, 64, 32, 64, 64, 32, num_warps=4, num_stages=2)
_ATTN_16 = {
    "sm80": {
        64: BlockConfig(num_warps=4),
        128: BlockConfig(),
        256: BlockConfig(64, 32, 32, 32, 64, 32, num_warps=4, num_stages=2),
    },  # fmt: skip
    "sm86": {
        64: BlockConfig(num_warps=4),
        128: _SMALL_16,
        256: BlockConfig(32, 32, 32, 32, 32, 32, num_warps=4, num_stages=1),
    },  # fmt: skip
}
_ATTN_16["sm90"] = _ATTN_16["sm80"]
# fp32 (ieee dots on FMA units, twice the bytes): 32 x 32 tiles, two stages at D <= 64 and one
# at 128 (64 x 32 tiles made ptxas spill ~8 KB per thread), 16 x 16 at 256; the same everywhere.
_ATTN_32 = {
    64: BlockConfig(32, 32, 32, 32, 32, 32, num_warps=4, num_stages=2),
    128: BlockConfig(32, 32, 32, 32, 32, 32, num_warps=4, num_stages=1),
    256: BlockConfig(16, 16, 16, 16, 16, 16, num_warps=4, num_stages=1),
}
_FAMILIES = ("sm80", "sm86", "sm90")
_ATTENTION: dict[tuple[str, int, str], BlockConfig] = {
    (dtype, bucket, family): table[bucket]
    for family in _FAMILIES
    for dtype, table in (
        ("bf16", _ATTN_16[family]),
        ("fp16", _ATTN_16[family]),
        ("fp32", _ATTN_32),
    )  # fmt: skip
    for bucket in table
}
# The interpreter: one shape for every dtype, large enough to keep the program count low.
_INTERPRETER_ATTENTION = BlockConfig(32, 32, 32, 32, 32, 32, num_warps=4, num_stages=1)

# Log-prob rows: 4096 elements keep ~16 fp32 values per thread at 8 warps (one 3584-wide row per
# program), enough loads in flight to stream at HBM speed without spilling; their only shared
# memory is the cross-warp reduction scratch (< 1 KB), so one rule fits every dtype and arch.
_GPU_ROW_ELEMS = 4096
_INTERPRETER_ROW_ELEMS = 32768


def normalize_dtype(dtype: object) -> str:
    """'bf16' / 'fp16' / 'fp32' from a torch dtype or one of those names."""
    name = str(dtype).removeprefix("torch.")
    name = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}.get(name, name)  # fmt: skip
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)} (or the torch dtypes), got {dtype!r}")  # fmt: skip
    return name


def parse_arch(arch: str | int) -> int:
    """Compute capability as an int (80, 89, 90) from 'sm_80', '8.0', 80 or (8, 0)."""
    if isinstance(arch, tuple):
        return arch[0] * 10 + arch[1]
    text = str(arch).strip().lower().removeprefix("sm_").removeprefix("sm")
    try:
        cap = int(round(float(text) * 10)) if "." in text else int(text)
    except ValueError:
        cap = -1
    if cap not in SHARED_LIMITS:
        allowed = ", ".join(f"sm_{c}" for c in SHARED_LIMITS)
        raise ValueError(f"unsupported GPU arch {arch!r}: expected one of {allowed}")
    return cap


def arch_family(arch: str | int) -> str:
    """'interpreter', or the budget class of a GPU arch: 'sm80', 'sm86' or 'sm90'."""
    if arch == INTERPRETER:
        return INTERPRETER
    limit = SHARED_LIMITS[parse_arch(arch)]
    return "sm90" if limit >= SHARED_LIMITS[90] else "sm80" if limit >= SHARED_LIMITS[80] else "sm86"  # fmt: skip


def device_arch(device: object = None) -> str:
    """'sm_XY' of a CUDA device (the current one when None)."""
    import torch

    index = torch.device(device).index if device is not None else None
    return _cuda_arch(torch.cuda.current_device() if index is None else index)


@functools.cache
def _cuda_arch(index: int) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def block_d(head_dim: int) -> int:
    """The padded head dimension the kernels tile: a power of two, at least MIN_BLOCK_D."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    return max(MIN_BLOCK_D, 1 << (head_dim - 1).bit_length())


def tile_config(
    kernel: str, dtype: object, head_dim: int, arch: str | int
) -> BlockConfig | RowTiles:
    """Tiles for `kernel` ('latent_attention' or 'gaussian_logprob') at this dtype, head_dim (the
    row width for the log-prob kernels) and arch ('sm_80', 'sm_89', 'sm_90', ... or
    'interpreter').

    The shared memory a latent-attention pass needs grows with num_stages x (BLOCK_N x BLOCK_D)
    x bytes per element plus the BLOCK_M x BLOCK_D query tile, and must stay below
    `SHARED_LIMITS[arch]` (see the module docstring); the entries were checked by compiling them
    for every family (`monet-fast check-kernels`). head_dim is bucketed by its padded BLOCK_D
    (<= 64, <= 128, <= 256), so 80 and 96 share the 128 tiles.
    """
    dtype = normalize_dtype(dtype)
    family = arch_family(arch)
    if kernel == "gaussian_logprob":
        if head_dim < 1:
            raise ValueError(f"row width must be >= 1, got {head_dim}")
        elems = _INTERPRETER_ROW_ELEMS if family == INTERPRETER else _GPU_ROW_ELEMS
        # 16 is the smallest width that keeps tl.arange / vector loads well-formed for D = 1.
        width = min(max(1 << (head_dim - 1).bit_length(), 16), _GPU_ROW_ELEMS)
        return RowTiles(block_d=width, max_elems=elems)
    if kernel != "latent_attention":
        raise ValueError(f"kernel must be one of {list(KERNELS)}, got {kernel!r}")
    bucket = max(64, block_d(head_dim))
    if family == INTERPRETER:
        return _INTERPRETER_ATTENTION
    return _ATTENTION[(dtype, bucket, family)]


def row_launch(n_rows: int, n_cols: int, dtype: object, arch: str | int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps) of a log-prob launch: one row per program for wide rows,
    row blocks for narrow ones so that a program always moves a useful amount of data."""
    tiles = tile_config("gaussian_logprob", dtype, max(n_cols, 1), arch)
    rows = max(1, min(tiles.max_elems // tiles.block_d, 1 << max(n_rows - 1, 0).bit_length()))
    elems = rows * tiles.block_d
    num_warps = 4 if elems <= 2048 else 8 if elems <= 8192 else 16
    return rows, tiles.block_d, num_warps
