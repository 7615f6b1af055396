"""Fused Gaussian log-prob and latent policy loss (kernels/gaussian_logprob.py).

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py); on a GPU machine
the same tests run the compiled kernels on CUDA tensors. References: the plain-torch functions
of the same module (Monet `compute_latent_log_probs` in fp32, verl `compute_policy_loss`),
`torch.distributions.Normal`, and the reference oracles of REFERENCE.md §8 (15, 17).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from monet_fast.kernels import (
    gaussian_logprob,
    gaussian_logprob_reference,
    latent_policy_loss,
    latent_policy_loss_reference,
)
from monet_fast.kernels.tiles import row_launch
from torch.testing import assert_close

# The module, not the function of the same name that monet_fast.kernels re-exports.
glp = importlib.import_module("monet_fast.kernels.gaussian_logprob")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Leading shapes x D. D covers 1, an odd width, a power of two and the 7B hidden size (not a
# multiple of the 4096 block). Row counts for D = 3584 stay modest: the interpreter's cost grows
# with the data it moves.
SHAPES = [(1000, 1), (3, 77, 7), (513, 64), (4, 13, 3584)]
SIGMAS = [10.0, 1.0, 0.37]
# (dtype, grad rtol). The log-prob itself is fp32 from exactly upcast inputs, so its tolerance
# is fp32-level for every dtype. Gradients are rounded once to the input dtype; under the
# interpreter fp32->bf16/fp16 casts truncate instead of rounding, so allow about one ulp
# (bf16 2^-8, fp16 2^-10) plus the reference's own rounding.
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)]


def _inputs(shape, z_dtype, mu_dtype, scale: float = 1.0):
    z = torch.randn(shape, device=DEVICE).to(z_dtype)
    mu = (z.float() + scale * torch.randn(shape, device=DEVICE)).to(mu_dtype)
    return z, mu


def _fused_and_reference_grads(fn_fused, fn_ref, z, mu, grad_out):
    """Run both functions with z and mu requiring grad; return (out, dz, dmu) for each.
    detach() (not clone(), which would make sliced / expanded inputs contiguous) keeps strides."""
    results = []
    for fn in (fn_fused, fn_ref):
        zz = z.detach().requires_grad_(True)
        mm = mu.detach().requires_grad_(True)
        out = fn(zz, mm)
        out.backward(grad_out)
        results.append((out.detach(), zz.grad, mm.grad))
    return results


# ------------------------------------------------------------------------------------------------
# gaussian_logprob
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, grad_rtol", DTYPES)
@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_logprob_forward_backward_match_reference(shape, sigma, dtype, grad_rtol):
    z, mu = _inputs(shape, dtype, dtype)
    grad_out = torch.randn(shape[:-1], device=DEVICE)
    (out, dz, dmu), (ref, dz_ref, dmu_ref) = _fused_and_reference_grads(
        lambda a, b: gaussian_logprob(a, b, sigma),
        lambda a, b: gaussian_logprob_reference(a, b, sigma),
        z,
        mu,
        grad_out,
    )
    assert out.dtype == torch.float32 and out.shape == shape[:-1]
    assert dz.dtype == dtype and dmu.dtype == dtype
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_close(dmu, dmu_ref, rtol=grad_rtol, atol=1e-5)
    assert_close(dz, dz_ref, rtol=grad_rtol, atol=1e-5)
    assert torch.equal(dz, -dmu)  # one pass writes both: exact negatives


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_logprob_matches_torch_normal_up_to_constant(shape, sigma):
    z, mu = _inputs(shape, torch.float32, torch.float32)
    normal = torch.distributions.Normal(mu.double(), sigma).log_prob(z.double()).sum(-1)
    with_constant = gaussian_logprob(z, mu, sigma, include_constant=True)
    assert_close(with_constant.double(), normal, rtol=1e-5, atol=1e-4)
    # Without the constant (the VLPO default) they differ by exactly D (log sigma + log sqrt 2pi).
    constant = shape[-1] * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
    without = gaussian_logprob(z, mu, sigma)
    assert_close(without.double() - constant, normal, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "z_dtype, mu_dtype",
    [
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
)
def test_logprob_mixed_dtypes(z_dtype, mu_dtype):
    z, mu = _inputs((37, 300), z_dtype, mu_dtype)
    grad_out = torch.randn(37, device=DEVICE)
    (out, dz, dmu), (ref, dz_ref, dmu_ref) = _fused_and_reference_grads(
        lambda a, b: gaussian_logprob(a, b, 2.0),
        lambda a, b: gaussian_logprob_reference(a, b, 2.0),
        z,
        mu,
        grad_out,
    )
    assert (dz.dtype, dmu.dtype) == (z_dtype, mu_dtype)
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_close(dz.float(), dz_ref.float(), rtol=1.6e-2, atol=1e-5)
    assert_close(dmu.float(), dmu_ref.float(), rtol=1.6e-2, atol=1e-5)


def test_logprob_is_fp32_accurate_where_bf16_eager_is_not():
    # Monet computes the log-prob in bf16: squares and the result are rounded to 8 mantissa bits
    # (relative error ~4e-3). The fused kernel works in fp32 on the same bf16 inputs.
    z, mu = _inputs((64, 3584), torch.bfloat16, torch.bfloat16, scale=0.05)
    exact = -0.5 * ((z.double() - mu.double()) ** 2).sum(-1) / 100.0
    fused = gaussian_logprob(z, mu, 10.0).double()
    bf16_eager = (-0.5 * ((z - mu) ** 2).sum(-1) / 100.0).double()  # Monet's arithmetic
    fused_err = ((fused - exact).abs() / exact.abs()).max().item()
    eager_err = ((bf16_eager - exact).abs() / exact.abs()).max().item()
    assert fused_err < 1e-5
    assert eager_err > 100 * fused_err


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: t.transpose(0, 1), id="transposed"),  # last-dim stride != 1
        pytest.param(lambda t: t[::2, 1:-1], id="strided-rows-and-cols"),
        pytest.param(lambda t: t.unsqueeze(0).expand(3, -1, -1), id="expanded"),
    ],
)
def test_logprob_non_contiguous_inputs(make):
    base_z, base_mu = _inputs((70, 66), torch.bfloat16, torch.float32)
    z, mu = make(base_z), make(base_mu)
    assert not z.is_contiguous()
    grad_out = torch.randn(z.shape[:-1], device=DEVICE)
    (out, dz, dmu), (ref, dz_ref, dmu_ref) = _fused_and_reference_grads(
        lambda a, b: gaussian_logprob(a, b, 3.0),
        lambda a, b: gaussian_logprob_reference(a, b, 3.0),
        z,
        mu,
        grad_out,
    )
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_close(dmu, dmu_ref, rtol=1e-5, atol=1e-6)
    assert_close(dz, dz_ref, rtol=1.6e-2, atol=1e-5)


def test_logprob_grad_of_sum_and_only_required_grads():
    # .sum() hands the backward an expanded (stride-0) gradient; z is a constant as in VLPO.
    z, mu = _inputs((4, 5, 64), torch.bfloat16, torch.bfloat16)
    mu.requires_grad_(True)
    gaussian_logprob(z, mu).sum().backward()
    mu_ref = mu.detach().clone().requires_grad_(True)
    gaussian_logprob_reference(z, mu_ref).sum().backward()
    assert z.grad is None
    assert_close(mu.grad, mu_ref.grad, rtol=1.6e-2, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 7), (3, 0), (0, 0)], ids=str)
def test_logprob_empty(shape):
    z, mu = _inputs(shape, torch.float32, torch.bfloat16)
    mu.requires_grad_(True)
    out = gaussian_logprob(z, mu, 2.0, include_constant=True)
    ref = gaussian_logprob_reference(z, mu, 2.0, include_constant=True)
    assert out.shape == shape[:-1] and out.dtype == torch.float32
    assert_close(out, ref)
    out.sum().backward()
    assert mu.grad.shape == shape and mu.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf"), "10"])
@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda z, mu, s: gaussian_logprob(z, mu, s), id="logprob"),
        pytest.param(lambda z, mu, s: gaussian_logprob_reference(z, mu, s), id="reference"),
        pytest.param(
            lambda z, mu, s: latent_policy_loss(mu, z, 0.0, 1.0, 1.0, s), id="policy_loss"
        ),
    ],
)
def test_invalid_sigma_raises(fn, sigma):
    z, mu = _inputs((2, 8), torch.float32, torch.float32)
    with pytest.raises(ValueError, match="sigma"):
        fn(z, mu, sigma)


def test_invalid_inputs_raise():
    z, mu = _inputs((2, 8), torch.float32, torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        gaussian_logprob(z, mu[:, :4])
    with pytest.raises(ValueError, match="dtype"):
        gaussian_logprob(z.to(torch.int32), mu)
    with pytest.raises(ValueError, match="clip_low"):
        latent_policy_loss(mu, z, 0.0, 1.0, 1.0, clip_low=1.0)
    with pytest.raises(ValueError, match="clip_ratio_dual"):
        latent_policy_loss(mu, z, 0.0, 1.0, 1.0, clip_ratio_dual=1.0)
    with pytest.raises(ValueError, match="broadcast"):
        latent_policy_loss(mu, z, torch.zeros(3, device=DEVICE), 1.0, 1.0)


def test_gradcheck_references_fp64():
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    for include_constant in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, c=include_constant: gaussian_logprob_reference(a, b, 0.7, c), (z, mu)
        )
    # Policy loss away from its kinks (clip and clamp boundaries), all regimes present.
    logp = gaussian_logprob_reference(z, mu, 0.7).detach()
    old = logp - torch.tensor([0.5, -0.5, 2.0], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, -0.5], dtype=torch.float64)
    mask = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: latent_policy_loss_reference(b, a, old, adv, mask, 0.7), (z, mu)
    )
    # float64 through the public API goes to the reference, computed in float64.
    assert gaussian_logprob(z, mu).dtype == torch.float64


def test_triton_path_is_used_and_falls_back_without_triton(monkeypatch):
    z, mu = _inputs((5, 40), torch.float32, torch.float32)
    expected = gaussian_logprob_reference(z, mu)
    expected_loss = latent_policy_loss_reference(mu, z, -1.0, 1.0, 1.0)

    def boom(*args, **kwargs):
        raise AssertionError("unexpected call")

    with monkeypatch.context() as m:  # kernels available: the references must not be called
        m.setattr(glp, "gaussian_logprob_reference", boom)
        m.setattr(glp, "latent_policy_loss_reference", boom)
        assert_close(gaussian_logprob(z, mu), expected)
        assert_close(latent_policy_loss(mu, z, -1.0, 1.0, 1.0), expected_loss)
    # No CUDA and no interpreter: the kernels cannot run, the reference answers.
    monkeypatch.setattr(glp, "_INTERPRET", False)
    z_cpu, mu_cpu = z.cpu(), mu.cpu()
    monkeypatch.setattr(glp, "gaussian_logprob_forward", boom)
    monkeypatch.setattr(glp, "latent_policy_loss_forward", boom)
    assert_close(gaussian_logprob(z_cpu, mu_cpu), expected.cpu())
    out = latent_policy_loss(mu_cpu, z_cpu, -1.0, 1.0, 1.0, return_stats=True)
    assert_close(out.loss, expected_loss.cpu())


# ------------------------------------------------------------------------------------------------
# latent_policy_loss
# ------------------------------------------------------------------------------------------------

# log-ratios x = logp - old_logp covering every regime (outer clamp at +-10, PPO clip below
# log 0.8 and above log 1.3, dual clip above log 3 for A < 0), each at least 0.01 away from a
# kink so that fp32 rounding differences cannot flip a branch.
LOG_RATIOS = [-12.0, -3.0, -0.5, -0.1, 0.0, 0.1, 0.2, 0.5, 1.05, 1.2, 2.0, 5.0, 11.0]
ADVANTAGES = [1.3, -0.7, 0.0, -2.0]


def _policy_inputs(shape, mu_dtype, z_dtype, sigma, mask_kind):
    z, mu = _inputs(shape, z_dtype, mu_dtype)
    n = math.prod(shape[:-1])
    logp = gaussian_logprob_reference(z, mu, sigma)
    # Row i gets the pair (LOG_RATIOS[i % 13], ADVANTAGES[i // 13 % 4]): 52 rows cover every pair.
    i = torch.arange(n, device=DEVICE)
    x = torch.tensor(LOG_RATIOS, device=DEVICE)[i % len(LOG_RATIOS)]
    adv = torch.tensor(ADVANTAGES, device=DEVICE)[i // len(LOG_RATIOS) % len(ADVANTAGES)]
    old = logp - x.view(shape[:-1])
    mask = torch.rand(shape[:-1], device=DEVICE) > 0.2
    if mask_kind == "float":
        mask = mask.float() * 0.5
    return mu, z, old, adv.view(shape[:-1]), mask


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize(
    "mu_dtype, z_dtype, grad_rtol",
    [
        # ratio = exp(logp - old_logp) with |logp| ~ 30 and logp - old_logp ~ 1: one fp32 ulp of
        # logp (summation order differs from torch's) is a ~1e-5 relative change of the ratio,
        # and of everything proportional to it (loss, gradients).
        (torch.float32, torch.float32, 1e-4),
        (torch.bfloat16, torch.float16, 1.6e-2),  # rollout latents kept in fp16, policy in bf16
    ],
)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_policy_loss_matches_reference(shape, mu_dtype, z_dtype, grad_rtol, mask_kind):
    sigma = 10.0 if shape[-1] == 3584 else 1.0  # keep logp differences O(1) for every D
    mu, z, old, adv, mask = _policy_inputs(shape, mu_dtype, z_dtype, sigma, mask_kind)
    g_loss = torch.randn(shape[:-1], device=DEVICE)
    g_logp = torch.randn(shape[:-1], device=DEVICE)  # e.g. a KL term on logp
    outs = []
    for fn in (latent_policy_loss, latent_policy_loss_reference):
        mm = mu.detach().clone().requires_grad_(True)
        zz = z.detach().clone().requires_grad_(True)
        out = fn(mm, zz, old, adv, mask, sigma, 0.2, 0.3, return_stats=True)
        torch.autograd.backward([out.loss, out.logp], [g_loss, g_logp])
        outs.append((out, mm.grad, zz.grad))
    (out, dmu, dz), (ref, dmu_ref, dz_ref) = outs
    assert out.loss.dtype == torch.float32 and out.loss.shape == shape[:-1]
    assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-5)  # see the fp32 rtol note above
    assert_close(out.logp, ref.logp, rtol=1e-5, atol=1e-5)
    assert_close(out.ratio, ref.ratio, rtol=1e-4, atol=0)
    assert torch.equal(out.clipped, ref.clipped)
    assert torch.equal(out.dual_clipped, ref.dual_clipped)
    assert out.clipped.any() and out.dual_clipped.any() and not out.clipped.all()
    assert (dmu.dtype, dz.dtype) == (mu_dtype, z_dtype)
    # The row coefficient g_loss * dloss/dlogp + g_logp can cancel, so a small gradient element
    # may carry the absolute error of its larger terms (O(1) values, ~1e-5 relative): atol 1e-4.
    assert_close(dmu, dmu_ref, rtol=grad_rtol, atol=1e-4)
    assert_close(dz, dz_ref, rtol=grad_rtol, atol=1e-4)


def test_policy_loss_zero_gradient_where_clipped():
    shape = (5 * len(LOG_RATIOS), 64)
    mu, z, old, adv, mask = _policy_inputs(shape, torch.float32, torch.float32, 1.0, "bool")
    mask = torch.ones_like(mask)
    mu.requires_grad_(True)
    out = latent_policy_loss(mu, z, old, adv, mask, 1.0, return_stats=True)
    out.loss.sum().backward()
    x = out.logp.detach() - old
    outside = (x.abs() > 10) | (adv == 0)
    no_grad_rows = out.clipped | out.dual_clipped | outside
    assert no_grad_rows.any() and (~no_grad_rows).any()
    assert torch.all(mu.grad[no_grad_rows] == 0)
    assert torch.all(mu.grad[~no_grad_rows].abs().sum(-1) > 0)


def test_policy_loss_oracles():
    # REFERENCE.md §8 oracle 17 (clip .2/.3, dual 3): D = 1, sigma = 1, z - mu = 1 => logp = -0.5.
    mu = torch.zeros(2, 1, device=DEVICE)
    z = torch.ones(2, 1, device=DEVICE)
    old = torch.tensor([-1.0, -2.5], device=DEVICE)  # logp - old = 0.5 and 2
    adv = torch.tensor([1.0, -1.0], device=DEVICE)
    out = latent_policy_loss(mu, z, old, adv, torch.ones(2, device=DEVICE), 1.0, return_stats=True)
    assert_close(out.ratio, torch.tensor([1.6487213, 7.3890561], device=DEVICE))
    assert_close(out.loss, torch.tensor([-1.3, 3.0], device=DEVICE))
    assert out.clipped.tolist() == [True, False]
    assert out.dual_clipped.tolist() == [False, True]
    # Oracle 15: per-position -0.5 ||z - mu||^2 / 100 (sigma 10), a vector.
    h = torch.randn(1, 6, 16, device=DEVICE)
    poss = torch.tensor([1, 2, 4], device=DEVICE)
    zl = torch.randn(3, 16, device=DEVICE)
    assert_close(gaussian_logprob(zl, h[0, poss]), -0.5 * ((zl - h[0, poss]) ** 2).sum(-1) / 100)


def test_policy_loss_broadcast_and_default_return():
    shape = (4, 6, 32)
    mu, z, old, adv, mask = _policy_inputs(shape, torch.float32, torch.float32, 1.0, "bool")
    adv_per_seq = adv[:, :1]  # one advantage per sequence, broadcast over its latent steps
    loss = latent_policy_loss(mu, z, old, adv_per_seq, mask, 1.0)
    ref = latent_policy_loss_reference(mu, z, old, adv_per_seq, mask, 1.0)
    assert isinstance(loss, torch.Tensor) and loss.shape == (4, 6)
    assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_policy_loss_logp_only_backward():
    z, mu = _inputs((9, 40), torch.float32, torch.bfloat16)
    mu.requires_grad_(True)
    out = latent_policy_loss(mu, z, 0.0, 1.0, 1.0, 2.0, return_stats=True)
    out.logp.sum().backward()  # loss unused: the backward gets only the logp gradient
    mu_ref = mu.detach().clone().requires_grad_(True)
    gaussian_logprob_reference(z, mu_ref, 2.0).sum().backward()
    assert_close(mu.grad, mu_ref.grad, rtol=1.6e-2, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# GPU compilation without a GPU, and the GPU runs themselves.
# ------------------------------------------------------------------------------------------------


def _compile_sm90(kernel, args: dict, num_warps: int):
    """triton.compile for H100 (sm_90) with the specialisation the JIT would make for inputs
    whose pointers are 16-byte aligned and whose sizes / strides are multiples of 16 (see
    `monet_fast.kernel_check.compile_kernel`: "T:16" a type with that hint, a bare type string,
    anything else a constant)."""
    from monet_fast.kernel_check import compile_kernel

    return compile_kernel(kernel, args, "sm_90", num_warps)


def _sm90_compile_report() -> dict:
    """Compile every kernel for sm_90 as launched for 16384 x 3584 bf16 (plus a narrow, mixed-
    dtype, generic-stride variant); report which vector memory instructions the PTX uses."""
    assert not glp._INTERPRET, "needs a process where TRITON_INTERPRET was unset at import"
    block_rows, block_d, num_warps = row_launch(16384, 3584, "bf16", "sm_90")
    pair = {
        "Z_ptr": "*bf16:16",
        "Z_row_stride": "i32:16",
        "Z_col_stride": 1,
        "MU_ptr": "*bf16:16",
        "MU_row_stride": "i32:16",
        "MU_col_stride": 1,
        "n_rows": "i32:16",
        "n_cols": "i32:16",
        "BLOCK_ROWS": block_rows,
        "BLOCK_D": block_d,
    }
    fwd = _compile_sm90(
        glp._gaussian_logprob_forward_kernel,
        {**pair, "LOGP_ptr": "*fp32:16", "scale": "fp32", "constant": "fp32"},
        num_warps,
    )
    per_step = {f"{n}_ptr": "*fp32:16" for n in ("OLD_LOGP", "ADV", "LOSS", "LOGP", "RATIO")}
    policy = _compile_sm90(
        glp._latent_policy_loss_forward_kernel,
        {
            **pair,
            **per_step,
            "MASK_ptr": "*bf16:16",
            "DLOSS_DLOGP_ptr": "*fp32:16",
            "CLIPPED_ptr": "*i8:16",
            "DUAL_CLIPPED_ptr": "*i8:16",
            "OLD_LOGP_stride": 1,
            "ADV_stride": 1,
            "MASK_stride": 1,
            "scale": "fp32",
            "log_ratio_low": "fp32",
            "log_ratio_high": "fp32",
            "clip_ratio_dual": "fp32",
        },
        num_warps,
    )
    bwd = _compile_sm90(
        glp._gaussian_logprob_backward_kernel,
        {
            **pair,
            "G_ptr": "*fp32:16",
            "G_stride": 0,  # the expanded gradient of a .sum()
            "ROW_SCALE_ptr": "*fp32:16",
            "G2_ptr": "*fp32:16",
            "G2_stride": 1,
            "DZ_ptr": "*bf16:16",
            "DMU_ptr": "*bf16:16",
            "inv_var": "fp32",
            "HAS_ROW_SCALE": True,
            "HAS_G2": True,
            "COMPUTE_DZ": False,
            "COMPUTE_DMU": True,
        },
        num_warps,
    )
    narrow_rows, narrow_d, narrow_warps = row_launch(100000, 7, "fp16", "sm_90")
    narrow = _compile_sm90(
        glp._gaussian_logprob_backward_kernel,
        {
            **pair,
            "Z_ptr": "*fp16",
            "MU_ptr": "*fp32",
            "Z_row_stride": "i64",
            "Z_col_stride": "i32",
            "MU_row_stride": "i64",
            "MU_col_stride": "i32",
            "n_rows": "i32",
            "n_cols": "i32",
            "G_ptr": "*fp32",
            "G_stride": "i32",
            "ROW_SCALE_ptr": "*fp32",
            "G2_ptr": "*fp32",
            "G2_stride": "i32",
            "DZ_ptr": "*fp16",
            "DMU_ptr": "*fp32",
            "inv_var": "fp32",
            "HAS_ROW_SCALE": False,
            "HAS_G2": False,
            "COMPUTE_DZ": True,
            "COMPUTE_DMU": True,
            "BLOCK_ROWS": narrow_rows,
            "BLOCK_D": narrow_d,
        },
        narrow_warps,
    )
    kernels = {"forward": fwd, "policy_forward": policy, "backward": bwd, "narrow": narrow}
    return {
        "launch_config": [block_rows, block_d, num_warps],
        **{
            name: {
                "has_cubin": bool(k.asm.get("cubin")),
                "ld_v4": "ld.global.v4" in k.asm["ptx"],
                "st_v4": "st.global.v4" in k.asm["ptx"],
            }
            for name, k in kernels.items()
        },
    }


def test_kernels_compile_for_sm90_with_vectorised_access(tmp_path):
    # The triton library caches its own helpers (tl.sum, ...) as interpreted functions when
    # TRITON_INTERPRET is set at import, after which GPU code generation fails: compile in a
    # fresh process without it, and with an empty cache so that it really compiles.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, __file__, "--sm90-compile-report"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["launch_config"] == [1, 4096, 8]  # one 3584-wide row per program, 8 warps
    assert all(report[k]["has_cubin"] for k in ("forward", "policy_forward", "backward", "narrow"))
    # 16-byte vector loads/stores of the bf16 rows: what streaming at HBM bandwidth needs.
    assert report["forward"]["ld_v4"] and report["policy_forward"]["ld_v4"]
    assert report["backward"]["ld_v4"] and report["backward"]["st_v4"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_large_rows_match_reference(dtype):
    z, mu = _inputs((16384, 3584), dtype, dtype)
    grad_out = torch.randn(16384, device=DEVICE)
    (out, dz, dmu), (ref, dz_ref, dmu_ref) = _fused_and_reference_grads(
        gaussian_logprob, gaussian_logprob_reference, z, mu, grad_out
    )
    assert_close(out, ref, rtol=1e-5, atol=1e-4)
    assert_close(dmu, dmu_ref, rtol=1.6e-2, atol=1e-5)
    assert_close(dz, dz_ref, rtol=1.6e-2, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Benchmark plumbing (the measurements themselves need a GPU).
# ------------------------------------------------------------------------------------------------


def test_bench_registered_and_skips_without_gpu(capsys):
    from monet_fast.bench import REGISTRY, run_benchmark
    from monet_fast.cli import main

    assert REGISTRY["logprob"] == "monet_fast.bench.logprob:run"
    if torch.cuda.is_available():
        pytest.skip("has a GPU: the benchmark would run for real")
    report = run_benchmark("logprob", quick=True)
    assert report.skipped and "CUDA" in report.skipped and not report.rows
    assert main(["bench", "logprob", "--quick"]) == 0
    assert "skipped: needs a CUDA GPU" in capsys.readouterr().out


def test_bench_case_factories_and_report(monkeypatch):
    from monet_fast.bench import logprob as bench

    assert bench.hbm_peak_bytes_per_s("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench.hbm_peak_bytes_per_s("NVIDIA H200") == 4.8e12
    assert bench.hbm_peak_bytes_per_s("NVIDIA GeForce RTX 4090") is None
    case = bench.Case("logprob", 16384, "fwd_bwd")
    assert bench.bytes_moved(case) == 5 * 16384 * 3584 * 2 + 2 * 16384 * 4
    # The callables the GPU benchmark times, run here on small CPU inputs.
    for op in bench.OPS:
        for mode in bench.MODES:
            small = bench.Case(op, 8, mode, dim=64)
            for provider in ("monet_fast", "eager", "eager_bf16"):
                bench.setup_case(small, provider, device=DEVICE)()
    # The report the GPU run assembles, with the timer and device faked.
    times = {"monet_fast": 1e-4, "eager": 4e-4, "eager_bf16": 3e-4, "compile": 2e-4}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench, "setup_case", lambda case, provider: provider)
    monkeypatch.setattr(bench, "_time_cuda", lambda provider, quick: times[provider])
    report = bench.run(quick=True)
    assert report.skipped is None and len(report.rows) == 2 * len(bench.PROVIDERS)
    fused = next(r for r in report.rows if r["provider"] == "monet_fast")
    assert fused["speedup_vs_eager"] == pytest.approx(4.0)
    assert fused["speedup_vs_compile"] == pytest.approx(2.0)
    assert fused["pct_hbm"] == pytest.approx(100 * fused["GB/s"] * 1e9 / 3.35e12)


if __name__ == "__main__" and sys.argv[1:] == ["--sm90-compile-report"]:
    print(json.dumps(_sm90_compile_report()))
