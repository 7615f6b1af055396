"""`monet-fast check-kernels`: compile every Triton kernel variant the launchers can select for
GPU targets, without a GPU, and check that each fits the arch (shared memory per block).

A variant is one kernel with the tiles `kernels/tiles.py` picks for an (arch, dtype, head_dim)
(row width for the log-prob kernels), compiled with Triton's own pipeline down to a cubin
(`triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`, PTX by Triton's bundled
ptxas). Reported per variant: shared memory against `SHARED_LIMITS[arch]`, registers and spill
stores from the `ptxas -v` log. Mode flags (HAS_MASK, the backward's COMPUTE_* / HAS_*) are
compiled in their all-on state: switching one off only removes code. Exit status 1 when a
variant does not fit or fails to compile.

Code generation for a GPU target is impossible in a process where TRITON_INTERPRET was set
when the kernels were defined (pytest's conftest sets it), so the command then re-runs itself
in a child process without it. Compiles run in parallel worker processes and hit Triton's
cache on later runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

DEFAULT_ARCHS = ("sm_80", "sm_89", "sm_90")
DEFAULT_DTYPES = ("bf16", "fp16", "fp32")
DEFAULT_HEAD_DIMS = (64, 80, 128)
# Row widths of the log-prob kernels: the tiny test model, Qwen2.5-VL-3B and -7B hidden sizes
# (wider rows, e.g. 8192, select the same variant as 3584: one 4096-wide row per program).
DEFAULT_HIDDEN_SIZES = (64, 2048, 3584)
FAMILIES = ("latent_attention", "gaussian_logprob")
GQA_GROUP = 7  # Qwen2.5-VL-7B: 28 query heads over 4 kv heads (GROUP only bounds a loop)
_TYPE = re.compile(r"\*?(i1|i8|i16|i32|i64|fp16|bf16|fp32|fp64)(:16)?")
_TILE_FIELDS = ("fwd_m", "fwd_n", "dkdv_m", "dkdv_n", "dq_m", "dq_n", "num_warps", "num_stages")


# ---------------------------------------------------------------------------------------------
# Variants: what each launcher would launch, as (kernel, typed arguments, warps, stages).
# ---------------------------------------------------------------------------------------------


def _ref(kernel) -> str:
    """'module:name' of a jit function (variants cross process boundaries by name)."""
    return f"{kernel.fn.__module__}:{kernel.fn.__name__}"


def _resolve(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _attention_args(kernel, dtype: str, constexprs: dict) -> dict:
    """Argument spec of a latent-attention kernel: 'T' a type, 'T:16' a type the JIT would
    mark 16-divisible (aligned pointers, strides of 16-multiple widths), else a constexpr."""
    args = {}
    for name in kernel.arg_names:
        if name in constexprs:
            args[name] = constexprs[name]
        elif name in ("LSE_ptr", "DELTA_ptr"):
            args[name] = "*fp32:16"
        elif name.endswith("_ptr"):  # Q/K/V/O/dO/dQ/dK/dV data, else int32 tile tables
            data = name.split("_")[0] in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
            args[name] = f"*{dtype}:16" if data else "*i32:16"
        elif name.endswith("_stride"):
            args[name] = "i32:16"
        else:
            args[name] = "fp32" if name.endswith("scale") else "i32"
    return args


def _attention_variants(arch: str, dtype: str, head_dim: int, override: dict) -> list[dict]:
    import dataclasses

    # The module, not the function of the same name that monet_fast.kernels re-exports.
    la = importlib.import_module("monet_fast.kernels.latent_attention")
    from monet_fast.kernels.tiles import block_d, tile_config

    cfg = dataclasses.replace(tile_config("latent_attention", dtype, head_dim, arch), **override)
    bd = block_d(head_dim)
    common = dict(
        GROUP=GQA_GROUP, HEAD_DIM=head_dim, BLOCK_D=bd, HAS_MASK=True, DOT_FP32=False,
        DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
    )  # fmt: skip
    passes = [
        ("latent_attention_forward", la._latent_attention_forward_kernel, cfg.fwd_m, cfg.fwd_n),
        (
            "latent_attention_backward_dkdv",
            la._latent_attention_backward_dkdv_kernel,
            cfg.dkdv_m,
            cfg.dkdv_n,
        ),  # fmt: skip
        (
            "latent_attention_backward_dq",
            la._latent_attention_backward_dq_kernel,
            cfg.dq_m,
            cfg.dq_n,
        ),  # fmt: skip
    ]
    out = []
    for name, kernel, bm, bn in passes:
        tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}
        out.append(dict(
            kernel=name, fn=_ref(kernel), args=_attention_args(kernel, dtype, dict(common, **tiles)),
            tiles=tiles, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        ))  # fmt: skip
    # The delta preprocess has fixed tiles and Triton's default launch knobs.
    kernel = la._latent_attention_backward_preprocess_kernel
    tiles = {"BLOCK_M": 64, "BLOCK_D": bd}
    out.append(dict(
        kernel="latent_attention_backward_preprocess", fn=_ref(kernel),
        args=_attention_args(kernel, dtype, dict(tiles, HEAD_DIM=head_dim)), tiles=tiles,
        num_warps=4, num_stages=3,
    ))  # fmt: skip
    return out


def _logprob_variants(arch: str, dtype: str, width: int) -> list[dict]:
    glp = importlib.import_module("monet_fast.kernels.gaussian_logprob")
    from monet_fast.kernels.tiles import row_launch

    # Many rows: the launcher's largest row block for this width (fewer rows only shrink it).
    block_rows, bd, num_warps = row_launch(1 << 20, width, dtype, arch)
    tiles = {"BLOCK_ROWS": block_rows, "BLOCK_D": bd}
    pair = {
        "Z_ptr": f"*{dtype}:16", "Z_row_stride": "i32:16", "Z_col_stride": 1,
        "MU_ptr": f"*{dtype}:16", "MU_row_stride": "i32:16", "MU_col_stride": 1,
        "n_rows": "i32", "n_cols": "i32:16" if width % 16 == 0 else "i32", **tiles,
    }  # fmt: skip
    f32 = {n: "*fp32:16" for n in ("LOGP_ptr", "OLD_LOGP_ptr", "ADV_ptr", "MASK_ptr", "LOSS_ptr", "RATIO_ptr", "DLOSS_DLOGP_ptr", "G_ptr", "ROW_SCALE_ptr", "G2_ptr")}  # fmt: skip
    specs = [
        ("gaussian_logprob_forward", glp._gaussian_logprob_forward_kernel,
         {"scale": "fp32", "constant": "fp32"}),
        ("latent_policy_loss_forward", glp._latent_policy_loss_forward_kernel,
         {"OLD_LOGP_stride": 1, "ADV_stride": 1, "MASK_stride": 1, "CLIPPED_ptr": "*i8:16",
          "DUAL_CLIPPED_ptr": "*i8:16", "scale": "fp32", "log_ratio_low": "fp32",
          "log_ratio_high": "fp32", "clip_ratio_dual": "fp32"}),
        ("gaussian_logprob_backward", glp._gaussian_logprob_backward_kernel,
         {"G_stride": 1, "G2_stride": 1, "DZ_ptr": f"*{dtype}:16", "DMU_ptr": f"*{dtype}:16",
          "inv_var": "fp32", "HAS_ROW_SCALE": True, "HAS_G2": True, "COMPUTE_DZ": True,
          "COMPUTE_DMU": True}),
    ]  # fmt: skip
    out = []
    for name, kernel, extra in specs:
        args = {n: v for n, v in {**pair, **f32, **extra}.items() if n in kernel.arg_names}
        out.append(dict(kernel=name, fn=_ref(kernel), args=args, tiles=tiles, num_warps=num_warps, num_stages=3))  # fmt: skip
    return out


def variants(
    archs=DEFAULT_ARCHS, dtypes=DEFAULT_DTYPES, head_dims=DEFAULT_HEAD_DIMS,
    hidden_sizes=DEFAULT_HIDDEN_SIZES, families=FAMILIES, tiles_override: dict | None = None,
) -> list[dict]:  # fmt: skip
    """Every variant to compile: dicts with kernel, arch, dtype, head_dim, fn, args, tiles,
    num_warps, num_stages. tiles_override replaces fields of the latent-attention BlockConfig."""
    from monet_fast.kernels.tiles import normalize_dtype, parse_arch

    out = []
    for arch in archs:
        arch = f"sm_{parse_arch(arch)}"
        for dtype in map(normalize_dtype, dtypes):
            if "latent_attention" in families:
                for hd in head_dims:
                    for v in _attention_variants(arch, dtype, hd, tiles_override or {}):
                        out.append(dict(v, arch=arch, dtype=dtype, head_dim=hd))
            if "gaussian_logprob" in families:
                for width in hidden_sizes:
                    for v in _logprob_variants(arch, dtype, width):
                        out.append(dict(v, arch=arch, dtype=dtype, head_dim=width))
    return out


# ---------------------------------------------------------------------------------------------
# Compiling one variant and reading its resources.
# ---------------------------------------------------------------------------------------------


def compile_kernel(kernel, args: dict, arch: str | int, num_warps: int, num_stages: int = 3):
    """triton.compile `kernel` for a CUDA arch without a GPU. args maps every argument name to
    a type ('*bf16', 'i32', 'fp32'), a type with the JIT's 16-divisibility hint ('*bf16:16'),
    or a constant (constexprs such as "tf32", and ints equal to 1, which the JIT specialises)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from monet_fast.kernels.tiles import parse_arch

    names = list(kernel.arg_names)
    if set(args) != set(names):
        raise ValueError(f"{kernel.fn.__name__}: arguments {sorted(set(names) ^ set(args))} missing or unknown")  # fmt: skip
    signature, constexprs, attrs = {}, {}, {}
    for name in names:
        value = args[name]
        if isinstance(value, str) and _TYPE.fullmatch(value):
            signature[name] = value.removesuffix(":16")
            if value.endswith(":16"):
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", parse_arch(arch), 32)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})  # fmt: skip


def _ptxas_stats(log: str) -> dict | None:
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        return None
    spill = re.search(r"(\d+) bytes spill stores", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {
        "registers": int(regs.group(1)),
        "spills": int(spill.group(1)) if spill else 0,  # bytes of spill stores
        "stack_bytes": int(stack.group(1)) if stack else 0,
    }


def _run_ptxas(ptx: str, cap: int) -> str:
    """`ptxas -v` on the PTX (used when the cubin came from Triton's cache, without a log)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(cap).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(cap)}", src, "-o", os.path.join(tmp, "k.o")]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _compile_one(variant: dict) -> dict:
    """Compile one variant (in a worker process); returns its report row."""
    import triton

    from monet_fast.kernels.tiles import SHARED_LIMITS, parse_arch

    cap = parse_arch(variant["arch"])
    row = {k: variant[k] for k in ("kernel", "arch", "dtype", "head_dim")}
    row.update(shared_bytes=None, shared_limit=SHARED_LIMITS[cap], fits=False)
    row.update(registers=None, spills=None, stack_bytes=None)
    row.update(num_warps=variant["num_warps"], num_stages=variant["num_stages"], tiles=variant["tiles"])  # fmt: skip
    start = time.perf_counter()
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed by Triton
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = compile_kernel(_resolve(variant["fn"]), variant["args"], cap, variant["num_warps"], variant["num_stages"])  # fmt: skip
        stats = _ptxas_stats(log.getvalue()) or _ptxas_stats(_run_ptxas(compiled.asm["ptx"], cap))
        row.update(stats or {})
        row["shared_bytes"] = int(compiled.metadata.shared)
        row["fits"] = row["shared_bytes"] <= row["shared_limit"]
    except Exception as err:  # a compile failure is a result too (e.g. out of resources)
        # Triton's CompilationError starts with a source position and ends with the reason.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
        reason = lines[0] if lines[0] == lines[-1] else f"{lines[0]} ... {lines[-1]}"
        row["error"] = f"{type(err).__name__}: {reason[:300]}"
    row["compile_seconds"] = round(time.perf_counter() - start, 2)
    return row


def check_kernels(
    archs=DEFAULT_ARCHS, dtypes=DEFAULT_DTYPES, head_dims=DEFAULT_HEAD_DIMS,
    hidden_sizes=DEFAULT_HIDDEN_SIZES, families=FAMILIES, tiles_override: dict | None = None,
    jobs: int | None = None, progress=None,
) -> list[dict]:  # fmt: skip
    """Compile every variant (in `jobs` processes) and return one report row per variant, in
    `variants()` order. Needs a process where the kernels are compiled, not interpreted."""
    from monet_fast.kernels.latent_attention import _interpreting

    if _interpreting():
        raise RuntimeError("check_kernels needs TRITON_INTERPRET unset when the kernels are imported; use main()")  # fmt: skip
    todo = variants(archs, dtypes, head_dims, hidden_sizes, families, tiles_override)
    # Identical compiles (e.g. widths 3584 and 8192) run once.
    keys = [(v["fn"], v["arch"], repr(sorted(v["args"].items())), v["num_warps"], v["num_stages"]) for v in todo]  # fmt: skip
    unique = {k: v for k, v in zip(keys, todo)}
    # fp32 attention compiles are the slowest: start them first to balance the workers.
    order = sorted(unique, key=lambda k: (unique[k]["dtype"] != "fp32", k))
    jobs = max(1, jobs or min(os.cpu_count() or 1, 8))
    results = {}
    if jobs == 1:
        for k in order:
            results[k] = _compile_one(unique[k])
            if progress:
                progress(results[k])
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {k: pool.submit(_compile_one, unique[k]) for k in order}
            for k in order:
                results[k] = futures[k].result()
                if progress:
                    progress(results[k])
    rows = []
    for k, v in zip(keys, todo):
        rows.append(dict(results[k], head_dim=v["head_dim"]))
    return rows


def format_table(rows: list[dict]) -> str:
    """One line per variant: tiles, warps/stages, registers, spills, shared / limit, fit."""
    head = f"{'kernel':<38} {'arch':<6} {'dtype':<5} {'dim':>5} {'tiles':<22} {'w/s':<5} {'regs':>4} {'spill':>5} {'shared/limit':>15}  fits"  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        tiles = "x".join(str(v) for v in r["tiles"].values())
        shared = f"{r['shared_bytes'] or 0:>7}/{r['shared_limit']:<7}"
        fit = "yes" if r["fits"] else "NO  " + r.get("error", "")
        lines.append(
            f"{r['kernel']:<38} {r['arch']:<6} {r['dtype']:<5} {r['head_dim']:>5} {tiles:<22} "
            f"{r['num_warps']}/{r['num_stages']:<3} {r['registers'] or '-':>4} {r['spills'] if r['spills'] is not None else '-':>5} {shared:>15}  {fit}"
        )  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def _parse_tiles(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in _TILE_FIELDS or not value.isdigit():
            raise argparse.ArgumentTypeError(f"--tiles entry {item!r}: expected NAME=INT with NAME in {list(_TILE_FIELDS)}")  # fmt: skip
        out[key] = int(value)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", type=_csv(str), default=list(DEFAULT_ARCHS), help="comma-separated targets (default sm_80,sm_89,sm_90; also sm_86, sm_87, sm_100, sm_120)")  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--dtype", type=_csv(str), default=list(DEFAULT_DTYPES), help="default bf16,fp16,fp32")  # fmt: skip
    p.add_argument("--head-dim", type=_csv(int), default=list(DEFAULT_HEAD_DIMS), help="latent attention head dims (default 64,80,128)")  # fmt: skip
    p.add_argument("--hidden-size", type=_csv(int), default=list(DEFAULT_HIDDEN_SIZES), help="log-prob row widths (default 64,2048,3584)")  # fmt: skip
    p.add_argument("--kernel", type=_csv(str), default=list(FAMILIES), help="kernel families (default latent_attention,gaussian_logprob)")  # fmt: skip
    p.add_argument("--tiles", type=_parse_tiles, default={}, help="override latent-attention tiles, e.g. fwd_m=128,fwd_n=64,num_stages=3 (tuning)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count, at most 8)")  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    from monet_fast.kernels import tiles

    bad = sorted(set(args.kernel) - set(FAMILIES))
    if bad:
        raise ValueError(f"--kernel {bad}: expected some of {list(FAMILIES)}")
    # Validate here, so that a typo fails fast and in this process, not in the re-run child.
    for arch in args.arch:
        tiles.parse_arch(arch)
    for dtype in args.dtype:
        tiles.normalize_dtype(dtype)
    for head_dim in args.head_dim:
        tiles.block_d(head_dim)
    if any(width < 1 for width in args.hidden_size):
        raise ValueError(f"--hidden-size values must be >= 1, got {args.hidden_size}")
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interpreted or _kernels_interpreted():
        return _rerun_without_interpreter(args)
    start = time.perf_counter()
    done = []

    def progress(row: dict) -> None:  # one line per compile, as they finish
        done.append(row)
        shared = row["shared_bytes"] if row["shared_bytes"] is not None else row.get("error", "")
        print(f"[{len(done)}] {row['kernel']} {row['arch']} {row['dtype']} {row['head_dim']}: shared {shared} ({row['compile_seconds']} s)", file=sys.stderr, flush=True)  # fmt: skip

    rows = check_kernels(args.arch, args.dtype, args.head_dim, args.hidden_size, args.kernel, args.tiles, args.jobs, progress)  # fmt: skip
    print(format_table(rows))
    n_bad = sum(not r["fits"] for r in rows)
    print(f"{len(rows)} variants, {n_bad} not fitting, {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if n_bad else 0


def _kernels_interpreted() -> bool:
    module = sys.modules.get("monet_fast.kernels.latent_attention")
    return module is not None and module._interpreting()


def _rerun_without_interpreter(args: argparse.Namespace) -> int:
    argv = [sys.executable, "-m", "monet_fast.kernel_check", "--arch", ",".join(args.arch),
            "--dtype", ",".join(args.dtype), "--head-dim", ",".join(map(str, args.head_dim)),
            "--hidden-size", ",".join(map(str, args.hidden_size)), "--kernel", ",".join(args.kernel)]  # fmt: skip
    if args.tiles:
        argv += ["--tiles", ",".join(f"{k}={v}" for k, v in args.tiles.items())]
    if args.json:
        argv += ["--json", args.json]
    if args.jobs:
        argv += ["--jobs", str(args.jobs)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(argv, env=env).returncode


def register(subparsers) -> None:
    p = subparsers.add_parser("check-kernels", help="compile every Triton kernel variant for GPU targets (no GPU needed): shared memory, registers, spills")  # fmt: skip
    add_arguments(p)
    p.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monet-fast check-kernels", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ValueError as err:
        print(f"monet-fast check-kernels: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
