"""Token sampling shared by the decoders (`engine`, `slots`, `pyloop`): greedy, temperature,
top-p, with the exponential-race draw that needs no host sync (CUDA-graph capturable)."""

from __future__ import annotations

import torch


def sample_tokens(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: torch.Tensor,
    top_p: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Greedy argmax, or temperature + top-p sampling; [B, V] float32 -> [B] int64.

    Sampling uses the exponential-race form of multinomial (argmax of p / q with q ~ Exp(1)),
    which needs no host sync and is capturable in a CUDA graph. top-p keeps the smallest set of
    tokens whose probability reaches top_p (as transformers' TopPLogitsWarper, min 1 token);
    None skips it. temperature and top_p are 0-d tensors so a captured graph can be reused with
    other values.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`logits` [B, V] with -inf outside the smallest set of tokens whose probability reaches
    top_p (min 1 token); top_p: a 0-d tensor or one value per row [B, 1]."""
    sorted_logits, order = logits.sort(dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1.0 - top_p)
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
