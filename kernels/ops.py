"""The kernels as torch custom ops (`torch.ops.monet_fast.*`), so torch.compile sees them.

Each op is a forward/backward pair registered with `torch.library.custom_op`, a fake (meta)
implementation giving output shapes, dtypes and strides from the inputs alone, and an autograd
formula (`torch.library.register_autograd`) whose backward calls the backward op. This is how
Liger-Kernel and vLLM expose Triton kernels: `torch.compile(fullgraph=True)` keeps each op as
one opaque node (no graph break, the kernels are not traced) and AOTAutograd builds the joint
graph from the registered backward.

    monet_fast::latent_attention_fwd(q, k, v, masked_rows?, kv_lens?, q_offset, scale,
                                     block_m=0, block_n=0) -> (out, lse)
    monet_fast::latent_attention_bwd(dout, q, k, v, out, lse, masked_rows?, kv_lens?, q_offset,
                                     scale, block_m=0, block_n=0) -> (dq, dk, dv)
    monet_fast::gaussian_logprob_fwd(z, mu, sigma, include_constant) -> logp
    monet_fast::gaussian_logprob_bwd(z, mu, grad, sigma, need_dz, need_dmu) -> (dz, dmu)
    monet_fast::latent_policy_loss_fwd(mu, z, old_logp, advantages, mask, sigma, clip_low,
                                       clip_high, clip_ratio_dual)
        -> (loss, logp, ratio, dloss_dlogp, clipped, dual_clipped)
    monet_fast::latent_policy_loss_bwd(z, mu, grad_loss?, grad_logp?, dloss_dlogp, sigma,
                                       need_dz, need_dmu) -> (dz, dmu)

The tile plan of the latent mask (`LatentMaskPlan`) is a Python object, which a schema cannot
carry: the ops take the compact mask tensors and build (or reuse, memoised on tensor identity
and version) the plan inside the real implementation. Gradients the caller does not need come
back as empty [0] tensors (a schema has no optional outputs). The ops need Triton to run (CUDA
tensors, or CPU under TRITON_INTERPRET=1); the public functions (`latent_attention`,
`gaussian_logprob`, `latent_policy_loss`) call them there and fall back to the torch references
elsewhere.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

# import_module: the package attributes of these names are the re-exported public functions.
glp = importlib.import_module("monet_fast.kernels.gaussian_logprob")
la = importlib.import_module("monet_fast.kernels.latent_attention")

NAMESPACE = "monet_fast"


def _require_triton(op: str, *tensors: Tensor) -> None:
    if not all(t.is_cuda or (la._interpreting() and t.device.type == "cpu") for t in tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"{NAMESPACE}::{op} runs Triton kernels: needs CUDA tensors, or CPU tensors with "
            f"TRITON_INTERPRET=1 set before monet_fast.kernels is imported; got devices {devices}"
        )


# ---------------------------------------------------------------------------------------------
# latent_attention
# ---------------------------------------------------------------------------------------------


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _plan_and_config(q, k, masked_rows, kv_lens, q_offset, block_m, block_n):
    B, _, Sq, D = q.shape
    plan = la._get_plan(masked_rows, kv_lens, B, Sq, k.shape[2], q_offset, q.device)
    sizes = (block_m, block_n) if block_m > 0 and block_n > 0 else None
    return plan, la.block_config(D, sizes, q.dtype, q.device)


@torch.library.custom_op(f"{NAMESPACE}::latent_attention_fwd", mutates_args=())
def latent_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, masked_rows: Tensor | None, kv_lens: Tensor | None,
    q_offset: int, scale: float, block_m: int = 0, block_n: int = 0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(O like q, LSE fp32 [B, Hq, Sq] in base 2, +inf on rows with no allowed key)."""
    _require_triton("latent_attention_fwd", q, k, v)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Sq, _ = q.shape
    if Sq == 0 or k.shape[2] == 0:
        return torch.zeros_like(q), q.new_full((B, Hq, Sq), float("inf"), dtype=torch.float32)
    plan, config = _plan_and_config(q, k, masked_rows, kv_lens, q_offset, block_m, block_n)
    return la.latent_attention_forward(q, k, v, plan, scale, config)


@latent_attention_fwd.register_fake
def _(q, k, v, masked_rows, kv_lens, q_offset, scale, block_m=0, block_n=0):
    q = _last_dim_contiguous(q)
    B, Hq, Sq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, Sq), dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::latent_attention_bwd", mutates_args=())
def latent_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    masked_rows: Tensor | None, kv_lens: Tensor | None, q_offset: int, scale: float,
    block_m: int = 0, block_n: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(dq, dk, dv), each like its input (after making the last dim contiguous)."""
    _require_triton("latent_attention_bwd", q, k, v)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if q.shape[2] == 0 or k.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    plan, config = _plan_and_config(q, k, masked_rows, kv_lens, q_offset, block_m, block_n)
    return la.latent_attention_backward(dout, q, k, v, out, lse, plan, scale, config)


@latent_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, masked_rows, kv_lens, q_offset, scale, block_m=0, block_n=0):
    return tuple(torch.empty_like(_last_dim_contiguous(t)) for t in (q, k, v))


def _latent_attention_setup(ctx, inputs, output) -> None:
    q, k, v, masked_rows, kv_lens, q_offset, scale, block_m, block_n = inputs
    out, lse = output
    # The mask tensors are saved too: the backward rebuilds (or reuses) the same tile plan.
    ctx.save_for_backward(q, k, v, out, lse, masked_rows, kv_lens)
    ctx.args = (q_offset, scale, block_m, block_n)
    ctx.mark_non_differentiable(lse)


def _latent_attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, masked_rows, kv_lens = ctx.saved_tensors
    dq, dk, dv = torch.ops.monet_fast.latent_attention_bwd(
        dout, q, k, v, out, lse, masked_rows, kv_lens, *ctx.args
    )
    return dq, dk, dv, None, None, None, None, None, None


latent_attention_fwd.register_autograd(
    _latent_attention_backward, setup_context=_latent_attention_setup
)


# ---------------------------------------------------------------------------------------------
# gaussian_logprob
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::gaussian_logprob_fwd", mutates_args=())
def gaussian_logprob_fwd(z: Tensor, mu: Tensor, sigma: float, include_constant: bool) -> Tensor:
    """fp32 log N(z; mu, sigma^2 I) summed over the last dim, shape z.shape[:-1]."""
    _require_triton("gaussian_logprob_fwd", z, mu)
    return glp.gaussian_logprob_forward(z, mu, sigma, include_constant)


@gaussian_logprob_fwd.register_fake
def _(z, mu, sigma, include_constant):
    return z.new_empty(z.shape[:-1], dtype=torch.float32)


def _grads_or_empty(z, mu, dz, dmu) -> tuple[Tensor, Tensor]:
    """Custom ops have no optional outputs: a gradient not asked for is an empty [0] tensor."""
    return (
        dz if dz is not None else z.new_empty(0),
        dmu if dmu is not None else mu.new_empty(0),
    )


def _fake_grads(z, mu, need_dz, need_dmu) -> tuple[Tensor, Tensor]:
    dz = z.new_empty(z.shape) if need_dz else z.new_empty(0)
    return dz, mu.new_empty(mu.shape) if need_dmu else mu.new_empty(0)


@torch.library.custom_op(f"{NAMESPACE}::gaussian_logprob_bwd", mutates_args=())
def gaussian_logprob_bwd(
    z: Tensor, mu: Tensor, grad: Tensor, sigma: float, need_dz: bool, need_dmu: bool
) -> tuple[Tensor, Tensor]:
    """(dz, dmu) = (-g, +g) (z - mu) / sigma^2 per row, in z's / mu's dtypes."""
    _require_triton("gaussian_logprob_bwd", z, mu)
    dz, dmu = glp.gaussian_logprob_backward(z, mu, grad, sigma, need_dz, need_dmu)
    return _grads_or_empty(z, mu, dz, dmu)


@gaussian_logprob_bwd.register_fake
def _(z, mu, grad, sigma, need_dz, need_dmu):
    return _fake_grads(z, mu, need_dz, need_dmu)


def _gaussian_logprob_setup(ctx, inputs, output) -> None:
    z, mu, sigma, _ = inputs
    ctx.save_for_backward(z, mu)
    ctx.sigma = sigma


def _gaussian_logprob_backward(ctx, grad):
    z, mu = ctx.saved_tensors
    need_dz, need_dmu = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dz, dmu = torch.ops.monet_fast.gaussian_logprob_bwd(z, mu, grad, ctx.sigma, need_dz, need_dmu)
    return (dz if need_dz else None), (dmu if need_dmu else None), None, None


gaussian_logprob_fwd.register_autograd(
    _gaussian_logprob_backward, setup_context=_gaussian_logprob_setup
)


# ---------------------------------------------------------------------------------------------
# latent_policy_loss
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::latent_policy_loss_fwd", mutates_args=())
def latent_policy_loss_fwd(
    mu: Tensor, z: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, sigma: float,
    clip_low: float, clip_high: float, clip_ratio_dual: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Flat [N] (loss, logp, ratio, dloss/dlogp fp32; clipped, dual_clipped bool); per-step
    inputs must already have the batch shape mu.shape[:-1] (broadcast views are fine)."""
    _require_triton("latent_policy_loss_fwd", mu, z)
    return glp.latent_policy_loss_forward(
        mu, z, old_logp, advantages, mask, sigma, clip_low, clip_high, clip_ratio_dual
    )


@latent_policy_loss_fwd.register_fake
def _(mu, z, old_logp, advantages, mask, sigma, clip_low, clip_high, clip_ratio_dual):
    n = mu.shape[:-1].numel()
    f32 = [mu.new_empty(n, dtype=torch.float32) for _ in range(4)]
    return (*f32, mu.new_empty(n, dtype=torch.bool), mu.new_empty(n, dtype=torch.bool))


@torch.library.custom_op(f"{NAMESPACE}::latent_policy_loss_bwd", mutates_args=())
def latent_policy_loss_bwd(
    z: Tensor, mu: Tensor, grad_loss: Tensor | None, grad_logp: Tensor | None,
    dloss_dlogp: Tensor, sigma: float, need_dz: bool, need_dmu: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(dz, dmu) for k = grad_loss * dloss/dlogp + grad_logp per row (either grad may be None)."""
    _require_triton("latent_policy_loss_bwd", z, mu)
    if grad_loss is None and grad_logp is None:
        dz, dmu = _fake_grads(z, mu, need_dz, need_dmu)
        return dz.zero_(), dmu.zero_()
    if grad_loss is None:  # only logp was used downstream (e.g. a KL term alone)
        dz, dmu = glp.gaussian_logprob_backward(z, mu, grad_logp, sigma, need_dz, need_dmu)
    else:
        dz, dmu = glp.gaussian_logprob_backward(
            z, mu, grad_loss, sigma, need_dz, need_dmu, row_scale=dloss_dlogp, grad2=grad_logp
        )
    return _grads_or_empty(z, mu, dz, dmu)


@latent_policy_loss_bwd.register_fake
def _(z, mu, grad_loss, grad_logp, dloss_dlogp, sigma, need_dz, need_dmu):
    return _fake_grads(z, mu, need_dz, need_dmu)


def _latent_policy_loss_setup(ctx, inputs, output) -> None:
    mu, z, *_ = inputs
    sigma = inputs[5]
    loss, logp, ratio, dloss, clipped, dual = output
    ctx.save_for_backward(z, mu, dloss)
    ctx.sigma = sigma
    ctx.mark_non_differentiable(ratio, dloss, clipped, dual)
    # Unused outputs then give None gradients: a KL-only or loss-only use costs one pass.
    ctx.set_materialize_grads(False)


def _latent_policy_loss_backward(ctx, grad_loss, grad_logp, *_):
    z, mu, dloss = ctx.saved_tensors
    need_dmu, need_dz = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_loss is None and grad_logp is None:
        return (None,) * 9
    dz, dmu = torch.ops.monet_fast.latent_policy_loss_bwd(
        z, mu, grad_loss, grad_logp, dloss, ctx.sigma, need_dz, need_dmu
    )
    return (dmu if need_dmu else None), (dz if need_dz else None), *(None,) * 7


latent_policy_loss_fwd.register_autograd(
    _latent_policy_loss_backward, setup_context=_latent_policy_loss_setup
)
