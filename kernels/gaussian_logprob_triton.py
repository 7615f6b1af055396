"""Triton kernels of the fused Gaussian log-prob and VLPO latent policy loss (device code only).

Launched by `kernels/gaussian_logprob.py` (validation, launch configuration, the torch
references and the public functions); their autograd formulas and torch.library custom ops are
in `kernels/ops.py`. Every row is one latent step of width D: the squared distance is reduced in
fp32 over D-tiles, whatever the input dtypes. Whether they compile or run in the interpreter is
decided here, at definition time (`@triton.jit` reads TRITON_INTERPRET when this is imported).
"""

from __future__ import annotations

import triton
import triton.language as tl

# The policy-loss log-ratio is clamped to +-10 before exp, as in the reference (avoids inf/NaN).
_LOG_RATIO_LIMIT = tl.constexpr(10.0)


@triton.jit
def _row_sq_dist(
    Z_ptr,
    Z_row_stride,
    Z_col_stride,
    MU_ptr,
    MU_row_stride,
    MU_col_stride,
    rows,
    row_mask,
    n_cols,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """sum_d (z - mu)^2 for BLOCK_ROWS rows, upcasting each tile to fp32 before subtracting.

    The accumulator is a full [BLOCK_ROWS, BLOCK_D] fp32 tile reduced once at the end: each lane
    sums only ceil(D / BLOCK_D) terms and the final tree reduction keeps the error of a
    3584-term sum at fp32 level (a running scalar sum would not).
    """
    rows64 = rows.to(tl.int64)  # row * stride can pass 2^31 for large strided inputs
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_D):
        c = start + cols
        m = row_mask[:, None] & (c < n_cols)[None, :]
        z = tl.load(
            Z_ptr + rows64[:, None] * Z_row_stride + c[None, :] * Z_col_stride, mask=m, other=0.0
        )
        mu = tl.load(
            MU_ptr + rows64[:, None] * MU_row_stride + c[None, :] * MU_col_stride,
            mask=m,
            other=0.0,
        )
        d = z.to(tl.float32) - mu.to(tl.float32)
        acc += d * d
    return tl.sum(acc, axis=1)


@triton.jit
def _gaussian_logprob_forward_kernel(
    Z_ptr,
    Z_row_stride,
    Z_col_stride,
    MU_ptr,
    MU_row_stride,
    MU_col_stride,
    LOGP_ptr,  # [n_rows] fp32, contiguous
    n_rows,
    n_cols,
    scale,  # -0.5 / sigma^2
    constant,  # 0, or -D (log sigma + 0.5 log 2 pi) with include_constant
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """logp[r] = -0.5 / sigma^2 * sum_d (z[r, d] - mu[r, d])^2 + constant, in fp32."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    ssq = _row_sq_dist(
        Z_ptr,
        Z_row_stride,
        Z_col_stride,
        MU_ptr,
        MU_row_stride,
        MU_col_stride,
        rows,
        row_mask,
        n_cols,
        BLOCK_ROWS,
        BLOCK_D,
    )
    tl.store(LOGP_ptr + rows, ssq * scale + constant, mask=row_mask)


@triton.jit
def _latent_policy_loss_forward_kernel(
    Z_ptr,
    Z_row_stride,
    Z_col_stride,
    MU_ptr,
    MU_row_stride,
    MU_col_stride,
    OLD_LOGP_ptr,
    OLD_LOGP_stride,
    ADV_ptr,
    ADV_stride,
    MASK_ptr,
    MASK_stride,
    LOSS_ptr,  # [n_rows] fp32 outputs from here on, contiguous
    LOGP_ptr,
    RATIO_ptr,
    DLOSS_DLOGP_ptr,  # d loss / d logp, saved for the backward pass
    CLIPPED_ptr,  # int8: PPO clip active (reference metric pg_clipfrac_higher)
    DUAL_CLIPPED_ptr,  # int8: dual clip active (reference metric pg_clipfrac_lower)
    n_rows,
    n_cols,
    scale,  # -0.5 / sigma^2
    log_ratio_low,  # log(1 - clip_low)
    log_ratio_high,  # log(1 + clip_high)
    clip_ratio_dual,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per latent step: logp, then the clipped surrogate of verl `compute_policy_loss`.

        x       = logp - old_logp
        r       = exp(clamp(x, -10, 10));         c = exp(clamp(x, log(1-low), log(1+high)))
        higher  = max(-A r, -A c);                lower = min(higher, -A dual)
        loss    = mask * (lower if A < 0 else higher)

    d loss / d logp is the derivative autograd takes through that formula: clamp passes the
    gradient on its closed interval only, max/min send it to the larger/smaller operand and split
    it in halves on a tie (inside the clip range -A r == -A c exactly, so the halves add up to
    -A r), `where` routes it to the selected branch. Stored per row for the backward kernel.
    """
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    ssq = _row_sq_dist(
        Z_ptr,
        Z_row_stride,
        Z_col_stride,
        MU_ptr,
        MU_row_stride,
        MU_col_stride,
        rows,
        row_mask,
        n_cols,
        BLOCK_ROWS,
        BLOCK_D,
    )
    logp = ssq * scale
    old = tl.load(OLD_LOGP_ptr + rows64 * OLD_LOGP_stride, mask=row_mask, other=0.0)
    adv = tl.load(ADV_ptr + rows64 * ADV_stride, mask=row_mask, other=0.0).to(tl.float32)
    msk = tl.load(MASK_ptr + rows64 * MASK_stride, mask=row_mask, other=0.0).to(tl.float32)

    x = logp - old.to(tl.float32)
    r = tl.exp(tl.minimum(tl.maximum(x, -_LOG_RATIO_LIMIT), _LOG_RATIO_LIMIT))
    dr = tl.where((x >= -_LOG_RATIO_LIMIT) & (x <= _LOG_RATIO_LIMIT), r, 0.0)
    c = tl.exp(tl.minimum(tl.maximum(x, log_ratio_low), log_ratio_high))
    dc = tl.where((x >= log_ratio_low) & (x <= log_ratio_high), c, 0.0)

    pg1 = -adv * r
    pg2 = -adv * c
    higher = tl.maximum(pg1, pg2)
    d_higher = tl.where(
        pg1 > pg2, -adv * dr, tl.where(pg1 < pg2, -adv * dc, 0.5 * (-adv * dr) + 0.5 * (-adv * dc))
    )
    pg3 = -adv * clip_ratio_dual
    lower = tl.minimum(higher, pg3)
    d_lower = tl.where(higher < pg3, d_higher, tl.where(higher > pg3, 0.0, 0.5 * d_higher))
    neg = adv < 0.0
    loss = tl.where(neg, lower, higher) * msk
    dloss = tl.where(neg, d_lower, d_higher) * msk

    tl.store(LOSS_ptr + rows, loss, mask=row_mask)
    tl.store(LOGP_ptr + rows, logp, mask=row_mask)
    tl.store(RATIO_ptr + rows, r, mask=row_mask)
    tl.store(DLOSS_DLOGP_ptr + rows, dloss, mask=row_mask)
    tl.store(CLIPPED_ptr + rows, (pg1 < pg2).to(tl.int8), mask=row_mask)
    tl.store(DUAL_CLIPPED_ptr + rows, (neg & (higher > pg3)).to(tl.int8), mask=row_mask)


@triton.jit
def _gaussian_logprob_backward_kernel(
    Z_ptr,
    Z_row_stride,
    Z_col_stride,
    MU_ptr,
    MU_row_stride,
    MU_col_stride,
    G_ptr,  # [n_rows] upstream gradient of the per-row output
    G_stride,
    ROW_SCALE_ptr,  # [n_rows] d output / d logp (policy loss); read only if HAS_ROW_SCALE
    G2_ptr,  # [n_rows] extra upstream gradient of logp itself; read only if HAS_G2
    G2_stride,
    DZ_ptr,  # [n_rows, n_cols] contiguous, z's dtype; written only if COMPUTE_DZ
    DMU_ptr,  # [n_rows, n_cols] contiguous, mu's dtype; written only if COMPUTE_DMU
    n_rows,
    n_cols,
    inv_var,  # 1 / sigma^2
    HAS_ROW_SCALE: tl.constexpr,  # mode flag: coefficient = g * row_scale (policy loss)
    HAS_G2: tl.constexpr,  # mode flag: coefficient += g2 (logp output also used, e.g. KL)
    COMPUTE_DZ: tl.constexpr,  # mode flag: z requires grad
    COMPUTE_DMU: tl.constexpr,  # mode flag: mu requires grad
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """d logp / d mu = (z - mu) / sigma^2 and d logp / d z = -(z - mu) / sigma^2, times a per-row
    coefficient k (k = g for the log-prob, k = g * dloss/dlogp + g_logp for the policy loss).

    Both gradients come from one read of z and mu; the difference is formed in fp32 and rounded
    once, on the store, to the input's dtype.
    """
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    k = tl.load(G_ptr + rows64 * G_stride, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_ROW_SCALE:
        k = k * tl.load(ROW_SCALE_ptr + rows, mask=row_mask, other=0.0)
    if HAS_G2:
        k += tl.load(G2_ptr + rows64 * G2_stride, mask=row_mask, other=0.0).to(tl.float32)
    k = k * inv_var

    cols = tl.arange(0, BLOCK_D)
    for start in range(0, n_cols, BLOCK_D):
        c = start + cols
        m = row_mask[:, None] & (c < n_cols)[None, :]
        z = tl.load(
            Z_ptr + rows64[:, None] * Z_row_stride + c[None, :] * Z_col_stride, mask=m, other=0.0
        )
        mu = tl.load(
            MU_ptr + rows64[:, None] * MU_row_stride + c[None, :] * MU_col_stride,
            mask=m,
            other=0.0,
        )
        dmu = k[:, None] * (z.to(tl.float32) - mu.to(tl.float32))
        out_offsets = rows64[:, None] * n_cols + c[None, :]
        if COMPUTE_DMU:
            tl.store(DMU_ptr + out_offsets, dmu.to(DMU_ptr.dtype.element_ty), mask=m)
        if COMPUTE_DZ:
            tl.store(DZ_ptr + out_offsets, (-dmu).to(DZ_ptr.dtype.element_ty), mask=m)
