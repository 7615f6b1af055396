"""The kernels as torch custom ops (kernels/ops.py): `torch.library.opcheck` on each op (schema,
fake implementation, autograd registration, AOT dispatch with dynamic shapes), and
`torch.compile(fullgraph=True)` of the public functions: one op node each, no graph break, same
values and gradients as eager. CPU runs the Triton interpreter (conftest), CUDA the kernels.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from monet_fast.kernels import (
    gaussian_logprob,
    gaussian_logprob_reference,
    latent_attention,
    latent_policy_loss,
    latent_policy_loss_reference,
)
from torch._dynamo.testing import AotEagerAndRecordGraphs

from monet_fast.bench.latent_attention import stage2_masked_rows

la = importlib.import_module("monet_fast.kernels.latent_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ops = torch.ops.monet_fast


def _attention_inputs(seed: int = 0):
    """Small GQA shapes with a stage-2 mask and one padded sample (kv_lens)."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, S, D = 2, 2, 1, 24, 16
    q, k, v = (
        torch.randn(B, h, S, D, generator=g).to(DEVICE).requires_grad_() for h in (Hq, Hkv, Hkv)
    )
    mr = stage2_masked_rows(B, S, n_aux=1, latent_size=2, seed=seed).to(DEVICE)
    kv_lens = torch.tensor([S, S - 5], device=DEVICE)
    return q, k, v, mr, kv_lens


def _latent_inputs(seed: int = 0, n: int = 6, d: int = 40):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, d, generator=g).to(DEVICE).requires_grad_()
    z = (mu.detach() + 0.5 * torch.randn(n, d, generator=g).to(DEVICE)).requires_grad_()
    old = (-0.5 * (z - mu).square().sum(-1) / 100.0).detach() + 0.1 * torch.randn(n, generator=g).to(DEVICE)  # fmt: skip
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0, 0.0, 3.0][:n], device=DEVICE)
    mask = torch.tensor([1, 1, 0, 1, 1, 1][:n], dtype=torch.bool, device=DEVICE)
    return mu, z, old, adv, mask


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------


def test_opcheck_latent_attention():
    q, k, v, mr, kv_lens = _attention_inputs()
    # Block sizes forced small so that the tiny mask has skip, full and partial tiles.
    torch.library.opcheck(ops.latent_attention_fwd, (q, k, v, mr, kv_lens, 0, 0.25, 16, 16))
    torch.library.opcheck(ops.latent_attention_fwd, (q, k, v, None, None, 0, 0.25))
    out, lse = ops.latent_attention_fwd(q, k, v, mr, kv_lens, 0, 0.25, 16, 16)
    dout = torch.randn_like(out)
    args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, mr, kv_lens, 0, 0.25)
    torch.library.opcheck(ops.latent_attention_bwd, (*args, 16, 16))


def test_opcheck_gaussian_logprob():
    mu, z, *_ = _latent_inputs()
    for include_constant in (False, True):
        torch.library.opcheck(ops.gaussian_logprob_fwd, (z, mu, 10.0, include_constant))
    g = torch.randn(z.shape[:-1], device=DEVICE)
    for need_dz, need_dmu in ((True, True), (False, True)):
        torch.library.opcheck(
            ops.gaussian_logprob_bwd, (z.detach(), mu.detach(), g, 10.0, need_dz, need_dmu)
        )


def test_opcheck_latent_policy_loss():
    mu, z, old, adv, mask = _latent_inputs()
    torch.library.opcheck(ops.latent_policy_loss_fwd, (mu, z, old, adv, mask, 10.0, 0.2, 0.3, 3.0))
    *_, dloss, _, _ = ops.latent_policy_loss_fwd(mu, z, old, adv, mask, 10.0, 0.2, 0.3, 3.0)
    g = torch.randn(mu.shape[:-1], device=DEVICE)
    for g_loss, g_logp in ((g, None), (None, g), (g, 0.5 * g)):
        torch.library.opcheck(
            ops.latent_policy_loss_bwd,
            (z.detach(), mu.detach(), g_loss, g_logp, dloss, 10.0, True, True),
        )


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def _op_names(backend: AotEagerAndRecordGraphs) -> set[str]:
    """monet_fast ops called in the graphs Dynamo captured (no graph break: one graph)."""
    assert len(backend.graphs) == 1
    return {
        str(n.target).removesuffix(".default")
        for gm in backend.graphs
        for n in gm.graph.nodes
        if n.op == "call_function" and str(n.target).startswith("monet_fast.")
    }


def _grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def test_compile_latent_attention_fullgraph():
    q, k, v, mr, kv_lens = _attention_inputs(seed=1)

    def step(q, k, v, mr, kv_lens):
        # Attention, then ordinary torch ops around it: all in one graph.
        out = latent_attention(q, k, v, mr, kv_lens=kv_lens, block_sizes=(16, 16))
        return (out.float().square() * 0.5).sum()

    eager = step(q, k, v, mr, kv_lens)
    eager.backward()
    want = _grads(q, k, v)
    ref = la.latent_attention_reference(q, k, v, mr, kv_lens=kv_lens)
    (ref.square() * 0.5).sum().backward()
    torch.testing.assert_close(eager, (ref.square() * 0.5).sum(), atol=1e-4, rtol=1e-5)
    for g, w in zip(want, _grads(q, k, v)):  # the registered autograd formula vs SDPA's
        torch.testing.assert_close(g, w, atol=5e-5, rtol=1e-5)
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    got = compiled(q, k, v, mr, kv_lens)
    got.backward()
    assert _op_names(backend) == {"monet_fast.latent_attention_fwd"}
    # The backward graph calls the backward op (AOTAutograd partitions the joint graph).
    bwd_ops = {str(n.target) for gm in backend.bw_graphs for n in gm.graph.nodes}
    assert "monet_fast.latent_attention_bwd.default" in bwd_ops
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    for g, w in zip(_grads(q, k, v), want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_compile_latent_logprob_and_policy_loss_fullgraph():
    mu, z, old, adv, mask = _latent_inputs(seed=2)

    def step(mu, z, old, adv, mask, policy_loss=latent_policy_loss, logprob=gaussian_logprob):
        out = policy_loss(mu, z, old, adv, mask, return_stats=True)
        kl = (out.logp - old).square().mean()  # logp's gradient joins the same backward op
        return out.loss.sum() / mask.sum() + 0.1 * kl + logprob(z, mu).mean()

    ref = step(mu, z, old, adv, mask, latent_policy_loss_reference, gaussian_logprob_reference)
    ref.backward()
    want_ref = _grads(mu, z)
    eager = step(mu, z, old, adv, mask)
    eager.backward()
    want = _grads(mu, z)
    # Eager ops against the unfused torch reference (the autograd formula itself).
    torch.testing.assert_close(eager, ref, atol=1e-6, rtol=1e-5)
    for g, w in zip(want, want_ref):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    backend = AotEagerAndRecordGraphs()
    got = torch.compile(step, backend=backend, fullgraph=True)(mu, z, old, adv, mask)
    got.backward()
    assert _op_names(backend) == {
        "monet_fast.latent_policy_loss_fwd",
        "monet_fast.gaussian_logprob_fwd",
    }
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-5)
    for g, w in zip(_grads(mu, z), want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Behaviour of the op layer
# ---------------------------------------------------------------------------------------------


def test_one_tile_plan_per_mask_forward_and_backward(monkeypatch):
    """The op rebuilds nothing in the backward: the plan memo finds the forward's plan."""
    built = []
    real = la.LatentMaskPlan

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(la, "LatentMaskPlan", counting)
    monkeypatch.setattr(la, "_last_plan", None)
    q, k, v, mr, kv_lens = _attention_inputs(seed=3)
    for _ in range(2):  # two "layers" on the same mask
        latent_attention(q, k, v, mr, kv_lens=kv_lens).sum().backward()
    assert len(built) == 1


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU error without the interpreter")
def test_ops_refuse_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(la, "_INTERPRETING", False)
    mu, z, *_ = _latent_inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.gaussian_logprob_fwd(z, mu, 10.0, False)
    # The public function falls back to the torch reference instead.
    monkeypatch.setattr(importlib.import_module("monet_fast.kernels.gaussian_logprob"), "_INTERPRET", False)  # fmt: skip
    torch.testing.assert_close(
        gaussian_logprob(z, mu), -0.5 * (z - mu).float().square().sum(-1) / 100.0
    )
