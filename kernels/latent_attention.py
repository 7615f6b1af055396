"""Block-sparse latent attention (the Monet stage-2 mask) in Triton: forward and backward.

Mask rule (REFERENCE.md §3.3, stored column-wise as in FlashMask): query i sits at absolute
position p = q_offset + i, key j at position j. Query i may attend key j iff

    j <= p  and  j < kv_lens[b]  and  p not in [r0, r1)  and  p not in [r2, r3),

where (r0, r1, r2, r3) = masked_rows[b, j] (int32 [B, Sk, 4]; empty intervals allowed). For an
auxiliary-image pad column j with latent slots [a0, a1) that is (j, a0, a1, L): causal except
that the image is hidden from everything but its own latent slots. A query with no allowed key
returns 0 (and gets zero gradient).

The mask is never materialised. Once per mask, `LatentMaskPlan` (`latent_mask_plan.py`) summarises each tile of
BLOCK_N key columns by the min/max of its interval ends and classifies every (query tile, key
tile) pair as skip (no allowed pair), full (all pairs allowed: no mask arithmetic) or partial,
then turns the classes into per-tile index lists (as FlexAttention's BlockMask does) so that
kernel loops run without branches and skipped tiles cost nothing. Forward and backward reuse
the plan (memoised on the mask tensors: the backward and the other layers find it again).
The autograd formula and the torch.library registration live in `kernels/ops.py`.

Credits: online softmax and the backward split (delta preprocess, dK/dV per key tile, dQ per
query tile) follow FlashAttention-2 (Dao, arXiv 2307.08691) and the Triton fused-attention
tutorial; the column-wise interval mask follows FlashMask (Wang et al., arXiv 2410.01359).

Without CUDA and without TRITON_INTERPRET=1, `latent_attention` runs the torch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# PADDING_COLUMN: model.attention builds padding columns through this module.
from monet_fast.kernels.latent_mask_plan import PADDING_COLUMN, LatentMaskPlan  # noqa: F401
from monet_fast.kernels.tiles import (
    INTERPRETER,
    MAX_HEAD_DIM,
    BlockConfig,
    block_d,
    device_arch,
    tile_config,
)
from triton.runtime.jit import JITFunction

_LOG2E = 1.4426950408889634


@triton.jit
def _allowed(pos, col, mr_ptrs, n_k_rows, HAS_MASK: tl.constexpr):
    """May query at absolute position `pos` see key column `col`? (2-D, broadcast together.)

    allowed = col <= pos and col < n_k_rows and pos outside [r0, r1) and [r2, r3) of column col;
    mr_ptrs points at masked_rows[b, col, 0] and has the shape of `col`.
    """
    ok = (col <= pos) & (col < n_k_rows)
    if HAS_MASK:
        in_range = col < n_k_rows
        r0 = tl.load(mr_ptrs + 0, mask=in_range, other=0)
        r1 = tl.load(mr_ptrs + 1, mask=in_range, other=0)
        r2 = tl.load(mr_ptrs + 2, mask=in_range, other=0)
        r3 = tl.load(mr_ptrs + 3, mask=in_range, other=0)
        ok = ok & ((pos < r0) | (pos >= r1)) & ((pos < r2) | (pos >= r3))
    return ok


@triton.jit
def _forward_tiles(
    acc, l_i, m_i, q, pos,
    k_base, K_row_stride, v_base, V_row_stride, mr_base,
    idx_ptr, n_tiles, n_k_rows, qk_scale, offs_d, d_ok,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of one query tile over the key tiles listed at idx_ptr."""
    for t in range(0, n_tiles):
        kt = tl.load(idx_ptr + t)
        offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < n_k_rows)[:, None] & d_ok[None, :]
        k = tl.load(
            k_base + offs_n[:, None] * K_row_stride + offs_d[None, :], mask=kv_mask, other=0.0
        )
        v = tl.load(
            v_base + offs_n[:, None] * V_row_stride + offs_d[None, :], mask=kv_mask, other=0.0
        )
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            ok = _allowed(
                pos[:, None], offs_n[None, :], mr_base + offs_n[None, :] * 4, n_k_rows, HAS_MASK
            )
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing allowed yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_ref = m_new
        if MASKED:
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _latent_attention_forward_kernel(
    Q_ptr, Q_batch_stride, Q_head_stride, Q_row_stride,
    K_ptr, K_batch_stride, K_head_stride, K_row_stride,
    V_ptr, V_batch_stride, V_head_stride, V_row_stride,
    O_ptr, O_batch_stride, O_head_stride, O_row_stride,
    LSE_ptr,  # [B, Hq, Sq] fp32: log2-sum-exp2 of the scaled scores, +inf for empty rows
    MR_ptr,  # [B, Sk, 4] int32 masked row intervals (read only when HAS_MASK)
    FULL_CNT_ptr, FULL_IDX_ptr, PART_CNT_ptr, PART_IDX_ptr,  # [B, nq], [B, nq, nk] int32
    n_q_heads, n_q_rows, n_k_rows, q_offset, qk_scale, n_q_tiles, n_k_tiles,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast tiles before tl.dot (bf16 under the interpreter)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, else "tf32" (ignored for 16-bit)
):  # fmt: skip
    """O = softmax(scale * Q K^T + M) V for one (query tile, batch*head), M the latent mask.

    Online softmax in base 2 (qk_scale = scale * log2 e): m = running row max, l = running
    sum of exp2(s - m), acc = running sum of exp2(s - m) V, all fp32; O = acc / l and
    LSE = m + log2 l is saved for the backward. Full key tiles run first without any mask
    arithmetic, partial tiles apply the interval test; skipped tiles are never listed.
    Query head h reads key/value head h // GROUP (GQA).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    hk = h // GROUP
    b64 = b.to(tl.int64)  # 64-bit base offsets: B*H*S*D passes 2**31 at long contexts
    q_base = Q_ptr + b64 * Q_batch_stride + h.to(tl.int64) * Q_head_stride
    k_base = K_ptr + b64 * K_batch_stride + hk.to(tl.int64) * K_head_stride
    v_base = V_ptr + b64 * V_batch_stride + hk.to(tl.int64) * V_head_stride
    o_base = O_ptr + b64 * O_batch_stride + h.to(tl.int64) * O_head_stride
    mr_base = MR_ptr + b64 * n_k_rows * 4

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < n_q_rows
    q = tl.load(q_base + offs_m[:, None] * Q_row_stride + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    if DOT_FP32:
        q = q.to(tl.float32)
    pos = q_offset + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row = b64 * n_q_tiles + pid_m
    acc, l_i, m_i = _forward_tiles(
        acc, l_i, m_i, q, pos, k_base, K_row_stride, v_base, V_row_stride, mr_base,
        FULL_IDX_ptr + row * n_k_tiles, tl.load(FULL_CNT_ptr + row), n_k_rows, qk_scale, offs_d, d_ok,
        BLOCK_N, False, HAS_MASK, DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _forward_tiles(
        acc, l_i, m_i, q, pos, k_base, K_row_stride, v_base, V_row_stride, mr_base,
        PART_IDX_ptr + row * n_k_tiles, tl.load(PART_CNT_ptr + row), n_k_rows, qk_scale, offs_d, d_ok,
        BLOCK_N, True, HAS_MASK, DOT_FP32, DOT_PRECISION,
    )  # fmt: skip

    # Rows with no allowed key: acc = 0 and l = 0, so O = 0; LSE = +inf makes every backward
    # probability exp2(s - LSE) exactly 0, hence zero gradients without special cases.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(o_base + offs_m[:, None] * O_row_stride + offs_d[None, :], out.to(O_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip
    tl.store(LSE_ptr + pid_bh.to(tl.int64) * n_q_rows + offs_m, lse, mask=row_ok)


@triton.jit
def _latent_attention_backward_preprocess_kernel(
    O_ptr, O_batch_stride, O_head_stride, O_row_stride,
    DO_ptr, DO_batch_stride, DO_head_stride, DO_row_stride,
    DELTA_ptr,  # [B, Hq, Sq] fp32
    n_q_heads, n_q_rows,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d dO[i, d] * O[i, d] (= sum_j P_ij dP_ij), in fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = (pid_bh % n_q_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < n_q_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O_ptr + b * O_batch_stride + h * O_head_stride + offs_m[:, None] * O_row_stride + offs_d[None, :], mask=mask, other=0.0)  # fmt: skip
    do = tl.load(DO_ptr + b * DO_batch_stride + h * DO_head_stride + offs_m[:, None] * DO_row_stride + offs_d[None, :], mask=mask, other=0.0)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA_ptr + pid_bh.to(tl.int64) * n_q_rows + offs_m, delta, mask=offs_m < n_q_rows)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, offs_n, q_base, Q_row_stride, do_base, DO_row_stride, lse_base, delta_base,
    mr_ptrs, idx_ptr, n_tiles, n_q_rows, n_k_rows, q_offset, qk_scale, offs_d, d_ok,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV of one key tile over the query tiles listed at idx_ptr (transposed)."""
    for t in range(0, n_tiles):
        mt = tl.load(idx_ptr + t)
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_q_rows
        mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * Q_row_stride + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(
            do_base + offs_m[:, None] * DO_row_stride + offs_d[None, :], mask=mask, other=0.0
        )
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # Rows past Sq load LSE = +inf, so their P^T column is 0.
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        p_t = tl.exp2(
            tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :]
        )
        if MASKED:
            ok = _allowed(
                (q_offset + offs_m)[None, :], offs_n[:, None], mr_ptrs, n_k_rows, HAS_MASK
            )
            p_t = tl.where(ok, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _latent_attention_backward_dkdv_kernel(
    Q_ptr, Q_batch_stride, Q_head_stride, Q_row_stride,
    K_ptr, K_batch_stride, K_head_stride, K_row_stride,
    V_ptr, V_batch_stride, V_head_stride, V_row_stride,
    DO_ptr, DO_batch_stride, DO_head_stride, DO_row_stride,
    DK_ptr, DK_batch_stride, DK_head_stride, DK_row_stride,
    DV_ptr, DV_batch_stride, DV_head_stride, DV_row_stride,
    LSE_ptr, DELTA_ptr,  # [B, Hq, Sq] fp32
    MR_ptr,  # [B, Sk, 4] int32
    FULL_CNT_ptr, FULL_IDX_ptr, PART_CNT_ptr, PART_IDX_ptr,  # key-major: [B, nk], [B, nk, nq]
    n_kv_heads, n_q_rows, n_k_rows, q_offset, qk_scale, sm_scale, n_q_tiles, n_k_tiles,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dV = P^T dO and dK = scale * dS^T Q for one (key tile, batch*kv head).

    P = exp2(qk_scale * Q K^T - LSE) (recomputed, masked), dP = dO V^T, dS = P * (dP - delta).
    The GROUP query heads sharing this kv head are summed here, in registers, so dK/dV need no
    atomics and are deterministic.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    b64 = b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n < n_k_rows)[:, None] & d_ok[None, :]
    k = tl.load(K_ptr + b64 * K_batch_stride + hk.to(tl.int64) * K_head_stride + offs_n[:, None] * K_row_stride + offs_d[None, :], mask=kv_mask, other=0.0)  # fmt: skip
    v = tl.load(V_ptr + b64 * V_batch_stride + hk.to(tl.int64) * V_head_stride + offs_n[:, None] * V_row_stride + offs_d[None, :], mask=kv_mask, other=0.0)  # fmt: skip
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    mr_ptrs = MR_ptr + b64 * n_k_rows * 4 + offs_n[:, None] * 4
    row = b64 * n_k_tiles + pid_n
    n_full = tl.load(FULL_CNT_ptr + row)
    n_part = tl.load(PART_CNT_ptr + row)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP):
        h = (hk * GROUP + g).to(tl.int64)
        q_base = Q_ptr + b64 * Q_batch_stride + h * Q_head_stride
        do_base = DO_ptr + b64 * DO_batch_stride + h * DO_head_stride
        stat = (b64 * n_kv_heads * GROUP + h) * n_q_rows
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, offs_n, q_base, Q_row_stride, do_base, DO_row_stride, LSE_ptr + stat,
            DELTA_ptr + stat, mr_ptrs, FULL_IDX_ptr + row * n_q_tiles, n_full, n_q_rows, n_k_rows,
            q_offset, qk_scale, offs_d, d_ok, BLOCK_M, False, HAS_MASK, DOT_FP32, DOT_PRECISION,
        )  # fmt: skip
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, offs_n, q_base, Q_row_stride, do_base, DO_row_stride, LSE_ptr + stat,
            DELTA_ptr + stat, mr_ptrs, PART_IDX_ptr + row * n_q_tiles, n_part, n_q_rows, n_k_rows,
            q_offset, qk_scale, offs_d, d_ok, BLOCK_M, True, HAS_MASK, DOT_FP32, DOT_PRECISION,
        )  # fmt: skip
    dk = dk * sm_scale
    tl.store(DK_ptr + b64 * DK_batch_stride + hk.to(tl.int64) * DK_head_stride + offs_n[:, None] * DK_row_stride + offs_d[None, :], dk.to(DK_ptr.dtype.element_ty), mask=kv_mask)  # fmt: skip
    tl.store(DV_ptr + b64 * DV_batch_stride + hk.to(tl.int64) * DV_head_stride + offs_n[:, None] * DV_row_stride + offs_d[None, :], dv.to(DV_ptr.dtype.element_ty), mask=kv_mask)  # fmt: skip


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, pos, k_base, K_row_stride, v_base, V_row_stride, mr_base,
    idx_ptr, n_tiles, n_k_rows, qk_scale, offs_d, d_ok,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate dS K of one query tile over the key tiles listed at idx_ptr."""
    for t in range(0, n_tiles):
        kt = tl.load(idx_ptr + t)
        offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < n_k_rows)[:, None] & d_ok[None, :]
        k = tl.load(
            k_base + offs_n[:, None] * K_row_stride + offs_d[None, :], mask=kv_mask, other=0.0
        )
        v = tl.load(
            v_base + offs_n[:, None] * V_row_stride + offs_d[None, :], mask=kv_mask, other=0.0
        )
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            ok = _allowed(
                pos[:, None], offs_n[None, :], mr_base + offs_n[None, :] * 4, n_k_rows, HAS_MASK
            )
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _latent_attention_backward_dq_kernel(
    Q_ptr, Q_batch_stride, Q_head_stride, Q_row_stride,
    K_ptr, K_batch_stride, K_head_stride, K_row_stride,
    V_ptr, V_batch_stride, V_head_stride, V_row_stride,
    DO_ptr, DO_batch_stride, DO_head_stride, DO_row_stride,
    DQ_ptr, DQ_batch_stride, DQ_head_stride, DQ_row_stride,
    LSE_ptr, DELTA_ptr,  # [B, Hq, Sq] fp32
    MR_ptr,  # [B, Sk, 4] int32
    FULL_CNT_ptr, FULL_IDX_ptr, PART_CNT_ptr, PART_IDX_ptr,  # query-major: [B, nq], [B, nq, nk]
    n_q_heads, n_q_rows, n_k_rows, q_offset, qk_scale, sm_scale, n_q_tiles, n_k_tiles,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dQ = scale * dS K for one (query tile, batch*head), dS = P * (dO V^T - delta).

    A separate pass over key tiles (rather than atomics from the dK/dV kernel) keeps dQ
    deterministic.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    hk = h // GROUP
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < n_q_rows
    mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q_ptr + b64 * Q_batch_stride + h.to(tl.int64) * Q_head_stride + offs_m[:, None] * Q_row_stride + offs_d[None, :], mask=mask, other=0.0)  # fmt: skip
    do = tl.load(DO_ptr + b64 * DO_batch_stride + h.to(tl.int64) * DO_head_stride + offs_m[:, None] * DO_row_stride + offs_d[None, :], mask=mask, other=0.0)  # fmt: skip
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    stat = pid_bh.to(tl.int64) * n_q_rows
    lse = tl.load(LSE_ptr + stat + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA_ptr + stat + offs_m, mask=row_ok, other=0.0)
    k_base = K_ptr + b64 * K_batch_stride + hk.to(tl.int64) * K_head_stride
    v_base = V_ptr + b64 * V_batch_stride + hk.to(tl.int64) * V_head_stride
    mr_base = MR_ptr + b64 * n_k_rows * 4
    pos = q_offset + offs_m
    row = b64 * n_q_tiles + pid_m
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_tiles(
        dq, q, do, lse, delta, pos, k_base, K_row_stride, v_base, V_row_stride, mr_base,
        FULL_IDX_ptr + row * n_k_tiles, tl.load(FULL_CNT_ptr + row), n_k_rows, qk_scale, offs_d, d_ok,
        BLOCK_N, False, HAS_MASK, DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse, delta, pos, k_base, K_row_stride, v_base, V_row_stride, mr_base,
        PART_IDX_ptr + row * n_k_tiles, tl.load(PART_CNT_ptr + row), n_k_rows, qk_scale, offs_d, d_ok,
        BLOCK_N, True, HAS_MASK, DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    dq = dq * sm_scale
    tl.store(DQ_ptr + b64 * DQ_batch_stride + h.to(tl.int64) * DQ_head_stride + offs_m[:, None] * DQ_row_stride + offs_d[None, :], dq.to(DQ_ptr.dtype.element_ty), mask=mask)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


# Decided when the kernels were defined (TRITON_INTERPRET read by @triton.jit at import); a
# constant, so torch.compile traces `_interpreting()` without looking at the kernel object.
_INTERPRETING = not isinstance(_latent_attention_forward_kernel, JITFunction)


def _interpreting() -> bool:
    return _INTERPRETING


def block_config(
    head_dim: int, block_sizes: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
) -> BlockConfig:  # fmt: skip
    """Tiles for this head_dim, dtype and the device's arch, from `kernels/tiles.py` (the
    interpreter's under TRITON_INTERPRET=1; the current CUDA device's when device is None).
    `block_sizes=(m, n)` forces one tile shape for all passes (tests, tuning)."""
    if block_sizes is not None:
        bm, bn = block_sizes
        return BlockConfig(bm, bn, bm, bn, bm, bn, num_warps=4, num_stages=2)
    arch = INTERPRETER if _interpreting() else device_arch(device)
    return tile_config("latent_attention", dtype, head_dim, arch)


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    # The interpreter's tl.dot is wrong on bf16 operands (ENVIRONMENT.md): upcast there.
    dot_fp32 = _interpreting() and dtype == torch.bfloat16
    return dot_fp32, "ieee" if dtype == torch.float32 else "tf32"


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def latent_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: LatentMaskPlan, scale: float,
    config: BlockConfig,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the forward kernel; returns (O like q, LSE [B, Hq, Sq] fp32, base 2)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    o = torch.empty_like(q)  # keeps q's layout: [B, S, H, D] memory for HF's transposed views
    lse = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)
    bm, bn = config.fwd_m, config.fwd_n
    lists = plan.tile_lists(bm, bn)
    mr = plan.masked_rows if plan.masked_rows is not None else lists.full_cnt  # unread dummy
    dot_fp32, precision = _dot_flags(q.dtype)
    grid = (triton.cdiv(Sq, bm), B * Hq)
    _latent_attention_forward_kernel[grid](
        q, *_strides(q), k, *_strides(k), v, *_strides(v), o, *_strides(o), lse, mr,
        lists.full_cnt, lists.full_idx, lists.part_cnt, lists.part_idx,
        Hq, Sq, Sk, plan.q_offset, scale * _LOG2E, triton.cdiv(Sq, bm), triton.cdiv(Sk, bn),
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=bm, BLOCK_N=bn,
        HAS_MASK=plan.masked_rows is not None, DOT_FP32=dot_fp32, DOT_PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return o, lse


def latent_attention_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, plan: LatentMaskPlan, scale: float, config: BlockConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch delta preprocess, dK/dV and dQ kernels; returns (dq, dk, dv) like (q, k, v)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    padded_d = block_d(D)  # power of two >= 16: tl.arange and tl.dot's K >= 16
    delta = torch.empty_like(lse)
    _latent_attention_backward_preprocess_kernel[(triton.cdiv(Sq, 64), B * Hq)](
        o, *_strides(o), do, *_strides(do), delta, Hq, Sq, HEAD_DIM=D, BLOCK_D=padded_d, BLOCK_M=64,
    )  # fmt: skip
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    has_mask = plan.masked_rows is not None
    dot_fp32, precision = _dot_flags(q.dtype)
    consts = dict(
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=padded_d, HAS_MASK=has_mask, DOT_FP32=dot_fp32,
        DOT_PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip

    bm, bn = config.dkdv_m, config.dkdv_n
    lists = plan.tile_lists(bm, bn, key_major=True)
    mr = plan.masked_rows if has_mask else lists.full_cnt
    _latent_attention_backward_dkdv_kernel[(triton.cdiv(Sk, bn), B * Hkv)](
        q, *_strides(q), k, *_strides(k), v, *_strides(v), do, *_strides(do),
        dk, *_strides(dk), dv, *_strides(dv), lse, delta, mr,
        lists.full_cnt, lists.full_idx, lists.part_cnt, lists.part_idx,
        Hkv, Sq, Sk, plan.q_offset, scale * _LOG2E, scale, triton.cdiv(Sq, bm), triton.cdiv(Sk, bn),
        BLOCK_M=bm, BLOCK_N=bn, **consts,
    )  # fmt: skip

    bm, bn = config.dq_m, config.dq_n
    lists = plan.tile_lists(bm, bn)
    _latent_attention_backward_dq_kernel[(triton.cdiv(Sq, bm), B * Hq)](
        q, *_strides(q), k, *_strides(k), v, *_strides(v), do, *_strides(do),
        dq, *_strides(dq), lse, delta, mr,
        lists.full_cnt, lists.full_idx, lists.part_cnt, lists.part_idx,
        Hq, Sq, Sk, plan.q_offset, scale * _LOG2E, scale, triton.cdiv(Sq, bm), triton.cdiv(Sk, bn),
        BLOCK_M=bm, BLOCK_N=bn, **consts,
    )  # fmt: skip
    return dq, dk, dv


def _apply_kernels(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked_rows: torch.Tensor | None,
    q_offset: int, kv_lens: torch.Tensor | None, scale: float,
    block_sizes: tuple[int, int] | None,
) -> torch.Tensor:  # fmt: skip
    """The custom op `monet_fast::latent_attention_fwd` (kernels/ops.py; autograd registered
    there), which builds or reuses the tile plan of this mask inside."""
    bm, bn = block_sizes if block_sizes is not None else (0, 0)
    out, _ = torch.ops.monet_fast.latent_attention_fwd(
        q, k, v, masked_rows, kv_lens, int(q_offset), scale, bm, bn
    )
    return out


# ---------------------------------------------------------------------------------------------
# Reference, dense expansion and the public entry point
# ---------------------------------------------------------------------------------------------


def dense_mask(
    masked_rows: torch.Tensor | None, n_q: int, n_k: int, q_offset: int = 0,
    kv_lens: torch.Tensor | None = None, device: torch.device | str | None = None,
) -> torch.Tensor:  # fmt: skip
    """Expand the compact description to a bool [B, 1, Sq, Sk] mask (True = may attend), B = 1
    when neither masked_rows nor kv_lens is given. O(Sq * Sk): for SDPA and tests only."""
    if device is None:
        device = next((t.device for t in (masked_rows, kv_lens) if isinstance(t, torch.Tensor)), "cpu")  # fmt: skip
    pos = q_offset + torch.arange(n_q, device=device)[:, None]
    col = torch.arange(n_k, device=device)[None, :]
    allowed = (col <= pos)[None, None]
    if kv_lens is not None:
        kv_lens = torch.as_tensor(kv_lens, device=device).reshape(-1, 1, 1, 1)
        allowed = allowed & (col < kv_lens)
    if masked_rows is not None:
        r = masked_rows[:, :n_k].to(device=device, dtype=torch.int64)[:, None, None]  # [B,1,1,Sk,4]
        p = pos[None, None]
        in1 = (p >= r[..., 0]) & (p < r[..., 1])
        in2 = (p >= r[..., 2]) & (p < r[..., 3])
        allowed = allowed & ~in1 & ~in2
    return allowed


def latent_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked_rows: torch.Tensor | None = None,
    q_offset: int = 0, kv_lens: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """Plain torch: SDPA with the dense mask, GQA by repeating kv heads; empty rows -> 0."""
    Hq, Sq, Hkv, Sk = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    allowed = dense_mask(masked_rows, Sq, Sk, q_offset, kv_lens, device=q.device)
    has_key = allowed.any(-1, keepdim=True)
    # SDPA gives NaN (value and gradient) on rows with no allowed key: let those rows attend
    # everywhere, then zero them; masked_fill passes no gradient to the filled rows.
    allowed = allowed | ~has_key
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return out.masked_fill(~has_key, 0.0)


# One-entry memo so that the layers of one forward (same mask tensors) share a plan. Holding
# the tensors themselves makes the identity check safe against address reuse.
_last_plan: tuple[tuple, LatentMaskPlan] | None = None


def _get_plan(
    masked_rows: torch.Tensor | None, kv_lens: torch.Tensor | None, batch: int, n_q: int,
    n_k: int, q_offset: int, device: torch.device | str,
) -> LatentMaskPlan:  # fmt: skip
    global _last_plan
    try:
        versions = tuple(t._version if isinstance(t, torch.Tensor) else None for t in (masked_rows, kv_lens))  # fmt: skip
    except RuntimeError:  # inference tensors have no version counter: no safe memo
        return LatentMaskPlan(masked_rows, kv_lens, batch, n_q, n_k, q_offset, device)
    key = (masked_rows, kv_lens, *versions, batch, n_q, n_k, int(q_offset), torch.device(device))
    if _last_plan is not None:
        old = _last_plan[0]
        same = all(
            type(a) is type(b) and (a is b or (not isinstance(a, torch.Tensor) and a == b))
            for a, b in zip(old, key)
        )
        if same:
            return _last_plan[1]
    plan = LatentMaskPlan(masked_rows, kv_lens, batch, n_q, n_k, q_offset, device)
    _last_plan = (key, plan)
    return plan


def latent_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked_rows: torch.Tensor | None = None,
    q_offset: int = 0, kv_lens: torch.Tensor | None = None, scale: float | None = None,
    *, block_sizes: tuple[int, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Attention under the latent (stage-2) mask; differentiable in q, k, v.

    Args:
        q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D] with Hq % Hkv == 0 (GQA); fp16/bf16/fp32;
            D in [1, 256] (64/80/96/128 are the model sizes; D < 16 is zero-padded to 16
            inside the kernels, tl.dot needing K >= 16). Any strides with a
            contiguous last dimension (e.g. HF's transposed [B, S, H, D] views).
        masked_rows: int [B or 1, >= Sk, 4]: rows [r0, r1) and [r2, r3) may not see key j
            (only the first Sk columns are read, so a whole-sequence description can be
            passed for a chunk); None = plain causal.
        q_offset: absolute position of query 0 (keys sit at 0..Sk-1), > 0 after a KV cache.
        kv_lens: int [B], number of valid (left-aligned) keys per sample, or None.
        scale: softmax scale, default 1/sqrt(D).
        block_sizes: force one (BLOCK_M, BLOCK_N) for every pass (tests, tuning).

    Returns O like q ([B, Hq, Sq, D], same layout); rows with no allowed key are 0.

    Runs the Triton kernels on CUDA tensors, or on CPU under TRITON_INTERPRET=1; otherwise
    (CPU without the interpreter) falls back to `latent_attention_reference`, i.e. SDPA with
    the dense mask.
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,Hq,Sq,D], k = v [B,Hkv,Sk,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or Hq % k.shape[1] != 0:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} (need same B, D and Hq % Hkv == 0)")  # fmt: skip
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:  # fmt: skip
        raise ValueError(f"q, k, v must share a dtype in fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")  # fmt: skip
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"latent_attention supports head_dim in [1, {MAX_HEAD_DIM}], got {D}")
    scale = D**-0.5 if scale is None else float(scale)
    use_triton = q.is_cuda or (_interpreting() and q.device.type == "cpu")
    if not use_triton:
        return latent_attention_reference(q, k, v, masked_rows, q_offset, kv_lens, scale)
    return _apply_kernels(q, k, v, masked_rows, q_offset, kv_lens, scale, block_sizes)
