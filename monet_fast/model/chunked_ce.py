"""Linear + cross-entropy over row chunks, without a full [N, V] logits tensor.

The plain loss materialises lm_head(h) for every target row at full vocabulary (152,064 columns
for Qwen2.5-VL), upcasts it to fp32 and keeps the log-softmax for backward: about 1.2 GB per
1,000 target tokens, plus its gradient. Here the forward computes per chunk of `chunk_size`
rows the fp32 logits, their log-sum-exp and the target logit, and keeps only h, W, the targets
and the [N] log-sum-exp; backward recomputes each chunk's logits and forms

    dCE/dlogits = softmax(logits) - onehot(target)         (times the incoming grad, / T)
    dh = dlogits @ W,   dW = Σ_chunks dlogits^T @ h

so the transient is one chunk × V. Precision follows the plain path (`losses.weighted_ce_sum`):
logits = F.linear(h, W) in the model dtype, then fp32; the logits gradient is cast back to the
model dtype for the two matmuls. dW is accumulated over chunks in fp32 (the plain path does the
whole sum in one matmul, also with fp32 accumulation).

Options used by the VLPO token log-probs (log p(token) = -CE): `temperature` divides the logits
and `ban_ids` sets columns to -inf (never sampled), as `rollout.BanTokens` does on full logits.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def _chunk_logits(h, weight, temperature, ban_ids):
    return _scaled(F.linear(h, weight), temperature, ban_ids)


def _scaled(logits, temperature, ban_ids):
    """fp32 logits / T with banned columns at -inf: the one rule both paths apply."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if ban_ids is not None and ban_ids.numel():
        logits = logits.index_fill(-1, ban_ids, float("-inf"))
    return logits


class LinearCrossEntropyFunction(torch.autograd.Function):
    """ce[i] = logsumexp(z_i) - z_i[t_i], z_i = fp32(h_i W^T) / T (banned columns -inf); fp32 [N]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature, ban_ids):
        n = hidden.shape[0]
        lse = hidden.new_empty(n, dtype=torch.float32)
        tgt_logit = hidden.new_empty(n, dtype=torch.float32)
        for s in range(0, n, chunk_size):
            z = _chunk_logits(hidden[s : s + chunk_size], weight, temperature, ban_ids)
            lse[s : s + chunk_size] = torch.logsumexp(z, dim=-1)
            tgt_logit[s : s + chunk_size] = z.gather(-1, targets[s : s + chunk_size, None])[:, 0]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size, ctx.temperature, ctx.ban_ids = chunk_size, temperature, ban_ids
        return lse - tgt_logit

    @staticmethod
    def backward(ctx, grad_ce):
        hidden, weight, targets, lse = ctx.saved_tensors
        cs, temp = ctx.chunk_size, ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        for s in range(0, hidden.shape[0], cs):
            h = hidden[s : s + cs]
            z = _chunk_logits(h, weight, temp, ctx.ban_ids)
            # softmax in place (0 at banned columns): one chunk x V buffer, not three.
            p = z.sub_(lse[s : s + cs, None]).exp_()
            p[torch.arange(h.shape[0], device=p.device), targets[s : s + cs]] -= 1.0
            g = p.mul_((grad_ce[s : s + cs] / temp)[:, None]).to(hidden.dtype)
            if need_h:
                grad_h[s : s + cs] = g @ weight
            if need_w:
                # fp32 accumulator over chunks; a bf16 chunk product rounds once per chunk.
                if g.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w.add_(g.t() @ h)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 256,
    temperature: float = 1.0,
    ban_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row CE [N] (fp32) of logits = hidden [N, H] @ weight [V, H]^T, chunked over rows."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy needs hidden [N, H] and weight [V, H], got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    return LinearCrossEntropyFunction.apply(
        hidden, weight, targets.long(), int(chunk_size), float(temperature), ban_ids
    )


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ban_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain full-vocabulary computation the chunked one must equal."""
    logits = _chunk_logits(hidden, weight, temperature, ban_ids)
    return F.cross_entropy(logits, targets.long(), reduction="none")


def head_cross_entropy(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 0,
    temperature: float = 1.0,
    ban_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row CE [N] (fp32) of `head(hidden)` against `targets`.

    chunk_size > 0 and a bias-free nn.Linear head: chunked (`linear_cross_entropy`); otherwise
    (chunk_size 0, or a wrapped head such as a LoRA'd lm_head) the plain full-vocabulary path.
    The chunked op runs as the head's forward (through `head(...)`), so module hooks still fire:
    DeepSpeed ZeRO-3 gathers the partitioned weight for it, as it does for the plain call.
    """
    plain = not chunk_size or type(head) is not nn.Linear or head.bias is not None
    if plain:
        logits = _scaled(head(hidden), temperature, ban_ids)
        return F.cross_entropy(logits, targets.long(), reduction="none")

    def forward(h):
        return linear_cross_entropy(
            h, head.weight, targets, chunk_size=chunk_size, temperature=temperature, ban_ids=ban_ids
        )

    with _forward_replaced(head, forward):
        return head(hidden)


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward):
    module.forward = forward  # instance attribute shadows the class's forward
    try:
        yield
    finally:
        del module.forward
