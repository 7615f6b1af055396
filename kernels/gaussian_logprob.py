"""Fused Gaussian log-prob and VLPO latent policy loss (Triton), with plain-torch references.

In VLPO a latent step is a Gaussian action with fixed scale sigma around the policy's hidden
state mu (width 3584 for Qwen2.5-VL-7B): log p(z) = -||z - mu||^2 / (2 sigma^2). Eager torch
materialises several full-width temporaries per latent (the difference, its square, their
gradients), and the Monet reference computes it in bf16, losing precision in the subtraction
and the 3584-term sum. Here:

* `gaussian_logprob(z, mu, sigma=10.0, include_constant=False)` reads z and mu once in the
  forward pass and once in the backward pass (which writes dmu and, only when needed, dz),
  doing the subtraction and the sum in fp32 whatever the input dtypes.
* `latent_policy_loss(mu, z, old_logp, advantages, mask, ...)` fuses that log-prob with the
  PPO/GRPO clipped surrogate of EasyR1/verl `compute_policy_loss` (ratio clamp, asymmetric
  clip, dual clip, mask): one pass over mu and z forward, one backward. It also returns the
  latent log-prob as a differentiable output, so the trainer's KL term reuses the same
  backward pass, and per-step ratio / clip indicators for logging.

Both have a torch reference in this file (`*_reference`), which is also what the public
functions fall back to when Triton cannot run: tensors not on CUDA and TRITON_INTERPRET unset
(the interpreter must be enabled before this module is imported, because `@triton.jit`
decides at definition time), or float64 inputs (computed in float64, e.g. for gradcheck).

Layout follows Liger-Kernel's ops files, per op: the Triton kernels in
`kernels/gaussian_logprob_triton.py`; validation, launchers, torch references and the public
functions here; the torch.library custom ops and their autograd formulas in `kernels/ops.py`;
the comparison tests in `tests/test_gaussian_logprob.py`.
Reference semantics: Monet `RL/verl/workers/actor/dp_actor.py::compute_latent_log_probs` and
`RL/verl/trainer/core_algos.py::compute_policy_loss` (see REFERENCE.md §5.2-5.3).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
from monet_fast.kernels.gaussian_logprob_triton import (
    _gaussian_logprob_backward_kernel,
    _gaussian_logprob_forward_kernel,
    _latent_policy_loss_forward_kernel,
)
from monet_fast.kernels.tiles import INTERPRETER, device_arch, row_launch

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SUPPORTED_DTYPES = _KERNEL_DTYPES + (torch.float64,)


# ----------------------------------------------------------------------------------------------
# Host side: validation, launch configuration, launchers.
# ----------------------------------------------------------------------------------------------

# Interpreted kernels are InterpretedFunction objects; compiled ones are JITFunction.
_INTERPRET = not isinstance(_gaussian_logprob_forward_kernel, triton.runtime.jit.JITFunction)


def _launch_config(
    n_rows: int, n_cols: int, dtype: torch.dtype, device: torch.device
) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps) from the tile table (kernels/tiles.py)."""
    arch = INTERPRETER if _INTERPRET else device_arch(device)
    return row_launch(n_rows, n_cols, dtype, arch)


def _use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels can run on these tensors (CUDA, or the CPU interpreter)."""
    if any(t.dtype not in _KERNEL_DTYPES for t in tensors):
        return False  # float64: computed by the reference in float64
    return _INTERPRET or all(t.is_cuda for t in tensors)


def _check_sigma(sigma: float) -> float:
    if isinstance(sigma, torch.Tensor):
        raise ValueError("sigma must be a Python number (a fixed policy scale), got a Tensor")
    number = isinstance(sigma, (int, float)) and not isinstance(sigma, bool)
    if not (number and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def _check_pair(z: torch.Tensor, mu: torch.Tensor) -> None:
    if z.shape != mu.shape:
        raise ValueError(
            f"z and mu must have the same shape [..., D], got {z.shape} and {mu.shape}"
        )
    if z.dim() == 0:
        raise ValueError("z and mu need a last (feature) dimension, got 0-d tensors")
    if z.device != mu.device:
        raise ValueError(f"z and mu must be on the same device, got {z.device} and {mu.device}")
    for name, t in (("z", z), ("mu", mu)):
        if t.dtype not in _SUPPORTED_DTYPES:
            allowed = [str(d) for d in _SUPPORTED_DTYPES]
            raise ValueError(f"{name} dtype must be one of {allowed}, got {t.dtype}")


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [N, D], a view whenever the leading dims can be merged (any strides)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: D may be 0


def _log_constant(n_cols: int, sigma: float, include_constant: bool) -> float:
    return -n_cols * (math.log(sigma) + _LOG_SQRT_2PI) if include_constant else 0.0


def gaussian_logprob_forward(
    z: torch.Tensor, mu: torch.Tensor, sigma: float, include_constant: bool
) -> torch.Tensor:
    """Launch the forward kernel on [..., D] inputs; returns fp32 logp of shape [...]."""
    z2, mu2 = _as_rows(z), _as_rows(mu)
    n_rows, n_cols = z2.shape
    constant = _log_constant(n_cols, sigma, include_constant)
    logp = torch.empty(n_rows, dtype=torch.float32, device=z.device)
    if n_cols == 0:
        logp.fill_(constant)
    elif n_rows > 0:
        block_rows, block_d, num_warps = _launch_config(n_rows, n_cols, z.dtype, z.device)
        _gaussian_logprob_forward_kernel[(triton.cdiv(n_rows, block_rows),)](
            z2,
            z2.stride(0),
            z2.stride(1),
            mu2,
            mu2.stride(0),
            mu2.stride(1),
            logp,
            n_rows,
            n_cols,
            -0.5 / (sigma * sigma),
            constant,
            BLOCK_ROWS=block_rows,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return logp.view(z.shape[:-1])


def gaussian_logprob_backward(
    z: torch.Tensor,
    mu: torch.Tensor,
    grad: torch.Tensor,
    sigma: float,
    need_dz: bool,
    need_dmu: bool,
    row_scale: torch.Tensor | None = None,
    grad2: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel: (dz, dmu) with k = grad [* row_scale] [+ grad2] per row."""
    z2, mu2 = _as_rows(z), _as_rows(mu)
    n_rows, n_cols = z2.shape
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device) if need_dz else None
    dmu = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device) if need_dmu else None
    if n_rows == 0 or n_cols == 0 or not (need_dz or need_dmu):
        return dz, dmu
    g = grad.reshape(-1)  # the gradient of a .sum() arrives expanded (stride 0): keep it a view
    g2 = grad2.reshape(-1) if grad2 is not None else g
    block_rows, block_d, num_warps = _launch_config(n_rows, n_cols, z.dtype, z.device)
    _gaussian_logprob_backward_kernel[(triton.cdiv(n_rows, block_rows),)](
        z2,
        z2.stride(0),
        z2.stride(1),
        mu2,
        mu2.stride(0),
        mu2.stride(1),
        g,
        g.stride(0),
        row_scale if row_scale is not None else g,
        g2,
        g2.stride(0),
        dz if dz is not None else dmu,  # unused pointer when the flag is off
        dmu if dmu is not None else dz,
        n_rows,
        n_cols,
        1.0 / (sigma * sigma),
        HAS_ROW_SCALE=row_scale is not None,
        HAS_G2=grad2 is not None,
        COMPUTE_DZ=need_dz,
        COMPUTE_DMU=need_dmu,
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return dz, dmu


# ----------------------------------------------------------------------------------------------
# Latent policy loss.
# ----------------------------------------------------------------------------------------------


class LatentPolicyLossOutput(NamedTuple):
    """`latent_policy_loss(..., return_stats=True)`; every field has the batch shape [...]."""

    loss: torch.Tensor  # fp32 per-step masked surrogate (differentiable w.r.t. mu, z)
    logp: torch.Tensor  # fp32 latent log-prob (differentiable; reuse it for the KL term)
    ratio: torch.Tensor  # fp32 exp(clamp(logp - old_logp, -10, 10)), detached
    clipped: torch.Tensor  # bool, PPO clip active: -A r < -A clip(r) (pg_clipfrac_higher)
    dual_clipped: torch.Tensor  # bool, dual clip active for A < 0 (pg_clipfrac_lower)


def _check_clip(clip_low: float, clip_high: float, clip_ratio_dual: float) -> None:
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low!r}")
    if not 0.0 <= clip_high < math.inf:
        raise ValueError(f"clip_high must be a finite number >= 0, got {clip_high!r}")
    if not clip_ratio_dual > 1.0:
        raise ValueError(
            f"clip_ratio_dual must be > 1 (verl's constraint), got {clip_ratio_dual!r}"
        )


def _per_step(name: str, t: torch.Tensor, batch_shape: torch.Size, device) -> torch.Tensor:
    """Broadcast a per-step tensor (old_logp, advantages, mask) to the batch shape."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    try:
        return t.detach().expand(batch_shape)
    except RuntimeError as err:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast to the latent steps' shape "
            f"{tuple(batch_shape)} (mu.shape[:-1])"
        ) from err


def latent_policy_loss_forward(
    mu: torch.Tensor,
    z: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    sigma: float,
    clip_low: float,
    clip_high: float,
    clip_ratio_dual: float,
) -> tuple[torch.Tensor, ...]:
    """Launch the fused forward; returns (loss, logp, ratio, dloss_dlogp, clipped, dual_clipped)
    as flat [N] tensors (per-step inputs already broadcast to mu.shape[:-1])."""
    z2, mu2 = _as_rows(z), _as_rows(mu)
    n_rows, n_cols = z2.shape
    old = old_logp.reshape(-1)
    adv = advantages.reshape(-1)
    msk = mask.reshape(-1)
    if not msk.is_floating_point():
        msk = msk.to(torch.float32)  # bool / int masks: tiny per-step tensor, convert on host
    f32 = dict(dtype=torch.float32, device=mu.device)
    loss, logp, ratio, dloss = (torch.empty(n_rows, **f32) for _ in range(4))
    clipped, dual = (torch.empty(n_rows, dtype=torch.int8, device=mu.device) for _ in range(2))
    if n_rows > 0:
        block_rows, block_d, num_warps = _launch_config(n_rows, n_cols, mu.dtype, mu.device)
        _latent_policy_loss_forward_kernel[(triton.cdiv(n_rows, block_rows),)](
            z2,
            z2.stride(0),
            z2.stride(1),
            mu2,
            mu2.stride(0),
            mu2.stride(1),
            old,
            old.stride(0),
            adv,
            adv.stride(0),
            msk,
            msk.stride(0),
            loss,
            logp,
            ratio,
            dloss,
            clipped,
            dual,
            n_rows,
            n_cols,
            -0.5 / (sigma * sigma),
            math.log(1.0 - clip_low),
            math.log(1.0 + clip_high),
            clip_ratio_dual,
            BLOCK_ROWS=block_rows,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return loss, logp, ratio, dloss, clipped.view(torch.bool), dual.view(torch.bool)


# ----------------------------------------------------------------------------------------------
# Plain-torch references (the definition the kernels are tested against, and the fallback).
# ----------------------------------------------------------------------------------------------


def gaussian_logprob_reference(
    z: torch.Tensor, mu: torch.Tensor, sigma: float = 10.0, include_constant: bool = False
) -> torch.Tensor:
    """-0.5 ||z - mu||^2 / sigma^2 over the last dim, in fp32 (float64 if an input is float64).

    Monet's `compute_latent_log_probs` without its bf16 arithmetic. With include_constant the
    result equals `torch.distributions.Normal(mu, sigma).log_prob(z).sum(-1)`.
    """
    sigma = _check_sigma(sigma)
    _check_pair(z, mu)
    acc = torch.promote_types(torch.promote_types(z.dtype, mu.dtype), torch.float32)
    diff = z.to(acc) - mu.to(acc)
    logp = diff.square().sum(-1) * (-0.5 / (sigma * sigma))
    if include_constant:
        logp = logp + _log_constant(z.shape[-1], sigma, True)
    return logp


def policy_loss_from_logp_reference(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    clip_ratio_dual: float = 3.0,
) -> LatentPolicyLossOutput:
    """verl/EasyR1 `compute_policy_loss`, per step (no mean), written as the reference writes it
    so that autograd gives the reference gradients (clamp / max / min / where semantics)."""
    log_ratio = torch.clamp(logp - old_logp, -10.0, 10.0)
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.exp(
        torch.clamp(logp - old_logp, math.log(1.0 - clip_low), math.log(1.0 + clip_high))
    )
    pg_loss = -advantages * ratio
    pg_loss2 = -advantages * clipped_ratio
    pg_loss3 = -advantages * clip_ratio_dual
    higher = torch.max(pg_loss, pg_loss2)
    lower = torch.min(higher, pg_loss3)
    final = torch.where(advantages < 0, lower, higher)
    loss = final * mask.to(final.dtype)
    return LatentPolicyLossOutput(
        loss=loss,
        logp=logp,
        ratio=ratio.detach(),
        clipped=(pg_loss < pg_loss2).detach(),
        dual_clipped=((higher > pg_loss3) & (advantages < 0)).detach(),
    )


def latent_policy_loss_reference(
    mu: torch.Tensor,
    z: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    sigma: float = 10.0,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    *,
    clip_ratio_dual: float = 3.0,
    return_stats: bool = False,
) -> torch.Tensor | LatentPolicyLossOutput:
    """Unfused reference of `latent_policy_loss` (same signature and outputs)."""
    _check_clip(clip_low, clip_high, clip_ratio_dual)
    logp = gaussian_logprob_reference(z, mu, sigma)
    batch = logp.shape
    out = policy_loss_from_logp_reference(
        logp,
        _per_step("old_logp", old_logp, batch, mu.device).to(logp.dtype),
        _per_step("advantages", advantages, batch, mu.device).to(logp.dtype),
        _per_step("mask", mask, batch, mu.device),
        clip_low,
        clip_high,
        clip_ratio_dual,
    )
    return out if return_stats else out.loss


# ----------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------


def gaussian_logprob(
    z: torch.Tensor, mu: torch.Tensor, sigma: float = 10.0, include_constant: bool = False
) -> torch.Tensor:
    """Log-density of the latent action z under N(mu, sigma^2 I), summed over the last dim.

    Args:
        z, mu: [..., D] tensors of the same shape, each fp32 / bf16 / fp16 (they may differ);
            any strides. Differentiable w.r.t. both; gradients come back in the input dtypes.
        sigma: the fixed policy scale (VLPO uses 10.0); a finite number > 0.
        include_constant: add -D (log sigma + 0.5 log 2 pi), making the result equal to
            `Normal(mu, sigma).log_prob(z).sum(-1)`. Off by default, as in Monet's VLPO.

    Returns:
        fp32 tensor of shape [...]: -0.5 ||z - mu||^2 / sigma^2 (+ constant), the difference and
        the sum computed in fp32 whatever the input dtypes.

    Runs the Triton kernels on CUDA tensors or under TRITON_INTERPRET=1; otherwise (and for
    float64 inputs, which are computed in float64) it falls back to `gaussian_logprob_reference`.

    Raises:
        ValueError: sigma <= 0 or not finite, shape / device mismatch, unsupported dtype.
    """
    sigma = _check_sigma(sigma)
    _check_pair(z, mu)
    if not _use_triton(z, mu):
        return gaussian_logprob_reference(z, mu, sigma, include_constant)
    # Custom op (kernels/ops.py) with its autograd formula: one node for torch.compile.
    return torch.ops.monet_fast.gaussian_logprob_fwd(z, mu, sigma, bool(include_constant))


def latent_policy_loss(
    mu: torch.Tensor,
    z: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    sigma: float = 10.0,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    *,
    clip_ratio_dual: float = 3.0,
    return_stats: bool = False,
) -> torch.Tensor | LatentPolicyLossOutput:
    """Fused VLPO latent-step PPO/GRPO surrogate: Gaussian log-prob + clipped ratio, per step.

    Per latent step (row of mu / z): logp = -0.5 ||z - mu||^2 / sigma^2 (fp32);
    r = exp(clamp(logp - old_logp, -10, 10)); clipped = clamp(r, 1 - clip_low, 1 + clip_high);
    pg = max(-A r, -A clipped); for A < 0 pg = min(pg, -A clip_ratio_dual); loss = pg * mask.
    Reduce it (masked mean over tokens and latents) in the trainer.

    Args:
        mu: [..., D] policy hidden states (fp32 / bf16 / fp16); gets the gradient.
        z: [..., D] rollout latents, same shape (may have another dtype); gradient if required.
        old_logp, advantages, mask: per-step tensors broadcastable to mu.shape[:-1]; treated as
            constants. mask may be bool, integer or float.
        sigma: Gaussian policy scale, > 0. clip_low, clip_high: PPO clip (ratio kept in
            [1 - clip_low, 1 + clip_high]). clip_ratio_dual: dual-clip bound for A < 0, > 1.
        return_stats: also return logp (differentiable, for the KL term: its gradient joins the
            same backward pass), ratio and clip indicators as a `LatentPolicyLossOutput`.

    Returns:
        The fp32 per-step loss of shape mu.shape[:-1], or a `LatentPolicyLossOutput`.

    Gradients equal autograd through `latent_policy_loss_reference`, including zero gradient
    where a clip is active. Falls back to the reference where Triton cannot run (see
    `gaussian_logprob`).
    """
    sigma = _check_sigma(sigma)
    _check_clip(clip_low, clip_high, clip_ratio_dual)
    _check_pair(z, mu)
    if not _use_triton(z, mu):
        return latent_policy_loss_reference(
            mu,
            z,
            old_logp,
            advantages,
            mask,
            sigma,
            clip_low,
            clip_high,
            clip_ratio_dual=clip_ratio_dual,
            return_stats=return_stats,
        )
    batch = mu.shape[:-1]
    loss, logp, ratio, _, clipped, dual = torch.ops.monet_fast.latent_policy_loss_fwd(
        mu,
        z,
        _per_step("old_logp", old_logp, batch, mu.device),
        _per_step("advantages", advantages, batch, mu.device),
        _per_step("mask", mask, batch, mu.device),
        sigma,
        float(clip_low),
        float(clip_high),
        float(clip_ratio_dual),
    )
    if not return_stats:
        return loss.view(batch)
    return LatentPolicyLossOutput(
        loss.view(batch), logp.view(batch), ratio.view(batch), clipped.view(batch), dual.view(batch)
    )
