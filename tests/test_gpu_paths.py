"""GPU-only checks that `make gpu-check` runs (`pytest -m gpu`): compiled Triton latent attention
in bf16 against SDPA, bf16 latent forward against fp32, and one DeepSpeed ZeRO-2 bf16 step.

Graph decoding == eager decoding and the CUDA `_C` latent step against torch live beside the
decoding tests; the fused log-prob on GPU beside its kernel tests. On a CPU machine every test
here is skipped (conftest), so nothing here may hide a CPU regression.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 references must be fp32: TF32 matmuls would make them the less precise side."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_latent_attention_vs_sdpa(head_dim, dtype):
    """Compiled (not interpreted) Triton kernels, 16-bit MMA, fwd + bwd, stage-2 mask, GQA 7:1."""
    from monet_fast.kernels.latent_attention import latent_attention, latent_attention_reference

    from monet_fast.bench.latent_attention import stage2_masked_rows

    gen = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, Hkv, L = 2, 28, 4, 1024

    def rand(h: int) -> torch.Tensor:
        return torch.randn(B, h, L, head_dim, generator=gen, device="cuda").to(dtype)

    q, k, v = rand(Hq), rand(Hkv), rand(Hkv)
    mr = stage2_masked_rows(B, L, device="cuda")
    dout = torch.randn(B, Hq, L, head_dim, generator=gen, device="cuda").to(dtype)

    def run(fn, cast):
        args = [t.detach().to(cast).requires_grad_(True) for t in (q, k, v)]
        out = fn(*args, mr)
        grads = torch.autograd.grad(out, args, dout.to(cast))
        return out.float(), [g.float() for g in grads]

    out, grads = run(latent_attention, dtype)
    ref, ref_grads = run(latent_attention_reference, torch.float32)  # same rounded inputs
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=6e-2, rtol=3e-2, msg=lambda m, n=name: f"d{n}: {m}")


def test_latent_forward_bf16_matches_fp32():
    """The whole stage-2 latent forward (Triton attention, latent feedback) in bf16 on CUDA."""
    from monet_fast.data import collate, make_samples
    from monet_fast.model import latent_forward, tiny_model

    model, processor = tiny_model(seed=0)
    batch = collate(make_samples(4, seed=1), processor, "stage2", latent_size=4)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to("cuda", dtype)
        with torch.no_grad():
            out = latent_forward(m, batch)
        losses[dtype] = float(out.loss)
        assert torch.isfinite(out.loss)
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) <= 0.05 * abs(losses[torch.float32])


def test_deepspeed_zero2_bf16_step():
    """One real DeepSpeed ZeRO-2 bf16 optimizer step of the stage-2 recipe on the GPU."""
    pytest.importorskip("deepspeed")
    from monet_fast.bench.train_step import Case, setup_case

    step = setup_case(Case("tiny", 2, zero_stage=2), "monet_fast")
    engine = step.engine
    assert engine.bfloat16_enabled() and engine.zero_optimization_stage() == 2
    weight = engine.module.model.lm_head.weight
    assert weight.is_cuda and weight.dtype == torch.bfloat16
    before = weight.detach().clone()
    step()
    torch.cuda.synchronize()
    after = engine.module.model.lm_head.weight.detach()
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after)
