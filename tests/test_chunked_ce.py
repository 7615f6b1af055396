"""Chunked linear + cross-entropy (monet_fast/model/chunked_ce.py) vs the plain full-vocabulary
loss: values and gradients (fp32), temperature and banned ids, and the head dispatch."""

import pytest
import torch
from torch import nn

from monet_fast.model.chunked_ce import (
    head_cross_entropy,
    linear_cross_entropy,
    reference_linear_cross_entropy,
)


def _inputs(n=37, h=24, v=301, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) * 0.3).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    grad_out = torch.rand(n, generator=g)
    return hidden, weight, targets, grad_out


def _value_and_grads(fn, hidden, weight, targets, grad_out, **kw):
    hidden.grad = weight.grad = None
    ce = fn(hidden, weight, targets, **kw)
    (ce * grad_out).sum().backward()
    return ce.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 1000])
@pytest.mark.parametrize("temperature, banned", [(1.0, None), (0.7, [3, 10, 300])])
def test_equals_reference(chunk_size, temperature, banned):
    hidden, weight, targets, grad_out = _inputs()
    ban = None if banned is None else torch.tensor(banned)
    if ban is not None:
        targets = torch.where(torch.isin(targets, ban), 0, targets)
    kw = dict(temperature=temperature, ban_ids=ban)
    ref = _value_and_grads(reference_linear_cross_entropy, hidden, weight, targets, grad_out, **kw)
    ours = _value_and_grads(
        linear_cross_entropy, hidden, weight, targets, grad_out, chunk_size=chunk_size, **kw
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ours[0].dtype == torch.float32


def test_frozen_weight_gives_hidden_grad_only():
    hidden, weight, targets, grad_out = _inputs()
    weight.requires_grad_(False)
    (linear_cross_entropy(hidden, weight, targets, chunk_size=8) * grad_out).sum().backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    (reference_linear_cross_entropy(hidden, weight, targets) * grad_out).sum().backward()
    torch.testing.assert_close(ours, hidden.grad, atol=1e-5, rtol=1e-5)
    assert weight.grad is None


def test_head_dispatch_and_hooks():
    hidden, weight, targets, _ = _inputs(n=5)
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    seen = []
    head.register_forward_pre_hook(lambda m, a: seen.append(1))  # ZeRO-3 gathers in such hooks
    plain = head_cross_entropy(head, hidden, targets, chunk_size=0)
    chunked = head_cross_entropy(head, hidden, targets, chunk_size=2)
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    assert len(seen) == 2 and "forward" not in vars(head)
    biased = nn.Linear(weight.shape[1], weight.shape[0])  # not chunkable: plain path
    torch.testing.assert_close(
        head_cross_entropy(biased, hidden, targets, chunk_size=2),
        nn.functional.cross_entropy(biased(hidden), targets, reduction="none"),
    )


def test_bad_input_errors():
    hidden, weight, targets, _ = _inputs(n=3)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"hidden \[N, H\] and weight \[V, H\]"):
        linear_cross_entropy(hidden, weight.t(), targets)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", ["stage3"])
def test_latent_forward_chunked_ce_equals_plain(stage):
    """The SFT CE through `loss.ce_chunk_size` (LossConfig) equals the full-logits CE."""
    from monet_fast.data import collate
    from monet_fast.model import latent_forward
    from monet_fast.model.losses import LossConfig
    from tests.test_latent_forward import K, make_sample
    from tests.test_vlpo import _tiny

    model, processor = _tiny()
    batch = collate(
        [make_sample(0, 1), make_sample(1, 2, words=4)], processor, stage, latent_size=K
    )
    results = []
    for chunk in (0, 5):
        model.zero_grad()
        out = latent_forward(model, batch, loss_config=LossConfig(ce_chunk_size=chunk))
        out.loss.backward()
        results.append((out.ce_sum.detach(), out.ce_weight, _grads(model)))
    model.zero_grad()
    (s0, w0, g0), (s1, w1, g1) = results
    assert out.n_target_tokens > 5  # several chunks
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(w1, w0, atol=0, rtol=0)
    assert g0.keys() == g1.keys() and "lm_head.weight" in g0
    for name in g0:
        # fp32 rounding of differently ordered sums, amplified along the latent chain: compare
        # on the scale of each gradient.
        scale = g0[name].abs().max().item()
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5 * scale + 1e-8, rtol=0, msg=name)


def test_vlpo_token_logprobs_chunked_equal_plain():
    """VLPO's token log-probs (-CE, temperature, banned ids) and one update's gradients."""
    from tests.test_grad_checkpointing import _vlpo_update_grads

    obj0, g0 = _vlpo_update_grads(ce_chunk_size=0)
    obj1, g1 = _vlpo_update_grads(ce_chunk_size=3)
    torch.testing.assert_close(obj1, obj0, atol=1e-6, rtol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(
            g1[name], g0[name], atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_step_logprobs_chunked_values():
    from monet_fast.model.tokens import TokenIds
    from monet_fast.train.rollout import (
        BanTokens,
        build_replay_batch,
        default_ban_ids,
        step_logprobs,
    )
    from tests.test_vlpo import K as VK
    from tests.test_vlpo import _manual_rollout, _tiny

    model, processor = _tiny()
    t = TokenIds.from_tokenizer(processor.tokenizer)
    ro = _manual_rollout(
        processor, [40, t.latent_start, *[t.latent_pad] * VK, t.latent_end, 41, t.im_end], VK
    )
    rb = build_replay_batch([ro], processor, VK)
    ban = BanTokens(default_ban_ids(processor.tokenizer))
    assert ban.ids
    with torch.no_grad():
        plain = step_logprobs(model, rb, temperature=0.7, ban=ban)
        chunked = step_logprobs(model, rb, temperature=0.7, ban=ban, ce_chunk_size=2)
    torch.testing.assert_close(chunked.token_logp, plain.token_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.mu, plain.mu, atol=0, rtol=0)
    assert (plain.token_logp < 0).all()
