"""`monet-fast bench latent-attention`: latent-mask attention vs FlexAttention vs dense SDPA.

Compares, on Qwen2.5-VL-7B attention shapes (28 query heads, 4 kv heads, head_dim 128, bf16)
and stage-2 layouts (a question image, then auxiliary images each followed by K = 8 latent
slots; their image tokens hidden from everything but those slots):

* `monet_fast`: `monet_fast.kernels.latent_attention` (Triton, block-sparse, compact mask);
* `flex`: `torch.compile(flex_attention)` with a BlockMask built from the same rule, GQA native;
* `sdpa_dense`: SDPA with the dense bool [B, 1, L, L] mask and repeated kv heads (what the
  reference and HF "sdpa" do).

Modes: `fwd` (no grad) and `fwd_bwd` (forward + grads of q, k, v). Mask preprocessing (our
tile plan, Flex's BlockMask, the dense mask) is built once per case, outside the timing, and
reported in the notes. TFLOP/s are effective: 4 * D * (allowed query-key pairs) * H per
forward, x 3.5 for forward + backward (the FlashAttention convention), the same count for
every provider.

The pytest-benchmark suite `benchmarks/bench_latent_attention.py` uses the same factories
(`CASES`, `setup_case`, `attention_flops`); the tests use `stage2_masked_rows` too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from monet_fast.bench.common import BenchReport, matches, no_match

# Qwen2.5-VL-7B language-model attention.
N_HEADS, N_KV_HEADS, HEAD_DIM = 28, 4, 128
SEQ_LENS = (2048, 4096, 8192, 16384)
BATCHES = (1, 4)
MODES = ("fwd", "fwd_bwd")
PROVIDERS = ("monet_fast", "flex", "sdpa_dense")
LATENT_SIZE = 8


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    batch: int
    seq_len: int
    mode: str  # "fwd" | "fwd_bwd"
    n_heads: int = N_HEADS
    n_kv_heads: int = N_KV_HEADS
    head_dim: int = HEAD_DIM
    dtype: torch.dtype = torch.bfloat16

    @property
    def label(self) -> str:
        return f"B{self.batch} L{self.seq_len} H{self.n_heads}/{self.n_kv_heads} D{self.head_dim}"


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case(1, n, mode) for n in (2048, 8192) for mode in MODES]
    return [Case(b, n, mode) for b in BATCHES for n in SEQ_LENS for mode in MODES]


CASES = cases(quick=False)


def stage2_masked_rows(
    batch: int, seq_len: int, n_aux: int = 3, latent_size: int = LATENT_SIZE, seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:  # fmt: skip
    """A stage-2-like layout per sample, as int32 [B, L, 4] masked-row intervals.

    About 1/4 of the sequence is a question image (visible, plain causal), then the assistant
    part holds `n_aux` auxiliary images of ~L/8 tokens each, every one followed by 2 tags and
    `latent_size` slots. Image-pad column j of aux image i with slots [a0, a1) masks rows
    [j, a0) and [a1, L) (REFERENCE.md §3.3). Sizes jitter per sample.
    """
    gen = torch.Generator().manual_seed(seed)
    mr = torch.zeros(batch, seq_len, 4, dtype=torch.int32)
    for b in range(batch):
        pos = seq_len // 4 + int(torch.randint(0, max(seq_len // 32, 1), (1,), generator=gen))
        for _ in range(n_aux):
            gap = 2 + int(torch.randint(0, max(seq_len // 32, 1), (1,), generator=gen))
            n_img = max(seq_len // 8 - int(torch.randint(0, max(seq_len // 32, 1), (1,), generator=gen)), 1)  # fmt: skip
            i0 = pos + gap
            a0 = i0 + n_img + 2  # <|vision_end|><abs_vis_token> between pads and slots
            a1 = a0 + latent_size
            if a1 + 1 >= seq_len:
                break
            j = torch.arange(i0, i0 + n_img)
            mr[b, i0 : i0 + n_img] = torch.stack(
                [j, torch.full_like(j, a0), torch.full_like(j, a1), torch.full_like(j, seq_len)], -1
            ).to(torch.int32)
            pos = a1 + 1
    return mr.to(device)


def allowed_pairs(masked_rows: torch.Tensor | None, n_q: int, n_k: int, q_offset: int = 0) -> int:
    """Number of allowed (query, key) pairs summed over the batch, in O(B * Sk)."""
    j = torch.arange(n_k, dtype=torch.int64)
    lo, hi = torch.maximum(j, torch.tensor(q_offset)), torch.tensor(q_offset + n_q)
    causal = (hi - lo).clamp(min=0)  # rows of column j allowed by causality
    if masked_rows is None:
        return int(causal.sum())
    r = masked_rows[:, :n_k].to("cpu", torch.int64)

    def overlap(a, b):  # |[a, b) ∩ [lo, hi)|
        return (torch.minimum(b, hi) - torch.maximum(a, lo)).clamp(min=0)

    both = overlap(torch.maximum(r[..., 0], r[..., 2]), torch.minimum(r[..., 1], r[..., 3]))
    masked = overlap(r[..., 0], r[..., 1]) + overlap(r[..., 2], r[..., 3]) - both
    return int((causal - masked).sum())


def attention_flops(case: Case, masked_rows: torch.Tensor) -> float:
    """Effective FLOPs of one call (the same count for every provider)."""
    fwd = (
        4.0 * case.head_dim * case.n_heads * allowed_pairs(masked_rows, case.seq_len, case.seq_len)
    )
    return fwd * (3.5 if case.mode == "fwd_bwd" else 1.0)


def make_inputs(case: Case, device: str | torch.device = "cuda", seed: int = 0) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(heads: int) -> torch.Tensor:
        shape = (case.batch, heads, case.seq_len, case.head_dim)
        return torch.randn(shape, generator=gen, device=device, dtype=case.dtype)

    return {
        "q": rand(case.n_heads),
        "k": rand(case.n_kv_heads),
        "v": rand(case.n_kv_heads),
        "masked_rows": stage2_masked_rows(case.batch, case.seq_len, seed=seed, device=device),
    }


def _flex_block_mask(masked_rows: torch.Tensor, n_q: int, n_k: int):
    """FlexAttention BlockMask for the same rule (mask_mod reads the same interval tensor)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mr = masked_rows

    def mask_mod(b, h, q_idx, kv_idx):
        r0, r1 = mr[b, kv_idx, 0], mr[b, kv_idx, 1]
        r2, r3 = mr[b, kv_idx, 2], mr[b, kv_idx, 3]
        hidden = ((q_idx >= r0) & (q_idx < r1)) | ((q_idx >= r2) & (q_idx < r3))
        return (kv_idx <= q_idx) & ~hidden

    return create_block_mask(mask_mod, mr.shape[0], None, n_q, n_k, device=mr.device)


_FLEX: dict[str, Callable] = {}


def setup_case(
    case: Case, provider: str, device: str | torch.device = "cuda", inputs: dict | None = None
) -> Callable[[], object]:
    """A zero-argument callable running `case` with `provider` (inputs and masks built once)."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    inputs = make_inputs(case, device) if inputs is None else inputs
    q, k, v, mr = inputs["q"], inputs["k"], inputs["v"], inputs["masked_rows"]
    n_rep = case.n_heads // case.n_kv_heads

    if provider == "monet_fast":
        from monet_fast.kernels.latent_attention import latent_attention

        def fn(q, k, v):
            return latent_attention(q, k, v, mr)  # the tile plan is memoised for this mr

    elif provider == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        if "flex" not in _FLEX:
            _FLEX["flex"] = torch.compile(flex_attention, dynamic=False)
        flex, block_mask = _FLEX["flex"], _flex_block_mask(mr, case.seq_len, case.seq_len)

        def fn(q, k, v):
            return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

    else:
        from monet_fast.kernels.latent_attention import dense_mask

        allowed = dense_mask(mr, case.seq_len, case.seq_len, device=device)

        def fn(q, k, v):
            # As HF "sdpa" with a mask: repeat kv heads (no GQA kernel takes an arbitrary mask).
            k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    if case.mode == "fwd":

        def run_fwd() -> object:
            with torch.no_grad():
                return fn(q, k, v)

        return run_fwd

    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    gen = torch.Generator(device=q.device).manual_seed(1)  # the same dO for every provider
    grad_out = torch.randn(q.shape, generator=gen, device=q.device, dtype=q.dtype)

    def run_fwd_bwd() -> object:
        # autograd.grad: no accumulation into .grad, which is not part of the op.
        return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)

    return run_fwd_bwd


def _time_cuda(fn: Callable[[], object], quick: bool) -> float:
    """Median seconds per call from CUDA events (triton do_bench)."""
    from monet_fast._optional import require

    do_bench = require("triton.testing", "GPU timing").do_bench
    return do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 200, return_mode="median") / 1e3  # fmt: skip


def _mask_build_seconds(mr: torch.Tensor, n: int) -> dict[str, float]:
    """One-off mask preprocessing cost per provider (not in the per-call timings)."""
    from monet_fast.kernels.latent_attention import block_config, dense_mask
    from monet_fast.kernels.latent_mask_plan import LatentMaskPlan

    def timed(f: Callable[[], object]) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        f()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    cfg = block_config(HEAD_DIM)

    def plan() -> None:
        p = LatentMaskPlan(mr, None, mr.shape[0], n, n, 0, mr.device)
        p.tile_lists(cfg.fwd_m, cfg.fwd_n)
        p.tile_lists(cfg.dkdv_m, cfg.dkdv_n, key_major=True)
        p.tile_lists(cfg.dq_m, cfg.dq_n)

    plan()  # warm the allocator / kernels once
    return {
        "monet_fast": timed(plan),
        "flex": timed(lambda: _flex_block_mask(mr, n, n)),
        "sdpa_dense": timed(lambda: dense_mask(mr, n, n, device=mr.device)),
    }


def run(quick: bool = False, only: str | None = None) -> BenchReport:
    """Benchmark every case on the GPU; on CPU return a report that says why it was skipped."""
    report = BenchReport(name="latent-attention")
    if not torch.cuda.is_available():
        report.skipped = (
            "needs a CUDA GPU: FlexAttention's backward is not supported on CPU and the Triton "
            "kernel runs there only in the interpreter (no CUDA device found)"
        )
        return report
    notes = []
    selected = [c for c in cases(quick) if matches(c.label, only)]
    if not selected:
        return no_match(report, only, [c.label for c in cases(quick)])
    for case in selected:
        inputs = make_inputs(case)
        flops = attention_flops(case, inputs["masked_rows"])
        times: dict[str, float] = {}
        for provider in PROVIDERS:
            try:
                times[provider] = _time_cuda(setup_case(case, provider, inputs=inputs), quick)
            except Exception as err:  # noqa: BLE001 - e.g. OOM or no flex: report, go on
                notes.append(f"{case.label} {case.mode} {provider}: failed ({err!r:.200})")
            torch.cuda.empty_cache()
        for provider, seconds in times.items():
            row = {
                "config": case.label,
                "mode": case.mode,
                "provider": provider,
                "seconds": seconds,
                "TFLOP/s": flops / seconds / 1e12,
            }
            if "sdpa_dense" in times:
                row["speedup_vs_sdpa_dense"] = times["sdpa_dense"] / seconds
            if "flex" in times:
                row["speedup_vs_flex"] = times["flex"] / seconds
            report.add(**row)
        if case.mode == "fwd" and case.batch == 1:
            build = _mask_build_seconds(inputs["masked_rows"], case.seq_len)
            notes.append(f"mask build {case.label}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in build.items()))  # fmt: skip
        del inputs
        torch.cuda.empty_cache()
    report.notes = (
        "Stage-2 layouts (question image, 3 aux images of ~L/8 tokens + 8 latent slots each), "
        "bf16. TFLOP/s = 4*D*H*(allowed pairs) per forward, x3.5 with backward. Target: "
        "monet_fast >= flex, >= 2x sdpa_dense at 8k (fwd_bwd).\n" + "\n".join(notes)
    )
    return report
