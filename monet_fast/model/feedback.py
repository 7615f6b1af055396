"""Latent feedback normalisation: what the fed-back hidden state is scaled to before reuse.

A latent step feeds the final post-norm hidden state back as the next input embedding. Its L2
norm is set by the last RMSNorm's weights and is usually far from the norm of the token
embeddings the first layer was trained on (the ratio is a diagnostic in the eval report). With
`feedback_norm = "match_embeddings"` every fed-back vector h is rescaled to

    h * (e / ||h||),   e = mean over rows of the input-embedding table of their L2 norm,

so its direction is kept and its norm is the typical input-embedding norm. `e` is computed in
float32 from the weights, detached (a constant, not a path for gradients), once per training
forward / per `generate` call. `"none"` feeds h unchanged (the reference behaviour).

The mode is a saved model-config field (`LatentConfig.feedback_norm`, in config.json), so the
batched training forward, the decoder and the VLPO replay all apply the same rule.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from monet_fast._optional import require

from .config import FEEDBACK_NORMS, check_feedback_norm, get_latent_config

# A hidden state with a smaller norm has no direction to keep: it is left unscaled (not blown up).
_EPS = 1e-6


@torch.no_grad()
def embedding_norm(model: Any) -> torch.Tensor:
    """Mean L2 norm of the rows of `model`'s input-embedding table: a float32 0-d tensor on the
    table's device (the "typical input-embedding norm")."""
    weight = model.get_input_embeddings().weight
    gathered = contextlib.nullcontext()
    if hasattr(weight, "ds_id"):
        # DeepSpeed ZeRO-3: outside the embedding's own forward the table is partitioned (an
        # empty local tensor, whose "norm" would be 0 and zero every fed-back latent). Gather it
        # to read it; every rank runs the forward, so the collective lines up.
        deepspeed = require("deepspeed", "latent.feedback_norm under ZeRO-3")
        gathered = deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
    with gathered:
        return weight.detach().float().norm(dim=-1).mean()


def rescale(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`hidden` [..., H] with each vector rescaled to L2 norm `target` (0-d tensor), same dtype.

    Pure tensor ops (CUDA-graph safe); vectors with norm <= 1e-6 are returned unchanged."""
    norm = hidden.float().norm(dim=-1, keepdim=True)
    scale = torch.where(norm > _EPS, target.to(norm.device) / norm.clamp_min(_EPS), 1.0)
    return (hidden.float() * scale).to(hidden.dtype)


class FeedbackNorm:
    """The feedback rule of one model: `fb(hidden)` gives the vector to feed back.

    `mode` "none" is the identity (no copy). The target norm is read from the weights when the
    object is built (`for_model`); build a new one after the embeddings change (each training
    forward and each `generate` call does).
    """

    def __init__(self, mode: str = "none", target: torch.Tensor | None = None) -> None:
        self.mode = check_feedback_norm(mode)
        if self.mode != "none" and target is None:
            raise ValueError(f"feedback_norm {mode!r} needs the target norm")
        self.target = target

    @classmethod
    def for_model(cls, model: Any) -> FeedbackNorm:
        mode = get_latent_config(model).feedback_norm
        return cls(mode, embedding_norm(model) if mode != "none" else None)

    @classmethod
    def refreshed(cls, previous: FeedbackNorm | None, model: Any) -> FeedbackNorm:
        """`for_model(model)`, but written into `previous`'s target tensor when the mode and
        device match: a captured CUDA graph that reads that tensor sees the new value."""
        new = cls.for_model(model)
        old = previous
        if (
            old is not None
            and old.mode == new.mode
            and old.target is not None
            and old.target.device == new.target.device
        ):
            old.target.copy_(new.target)
            return old
        return new

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return hidden
        return rescale(hidden, self.target)


__all__ = ["FEEDBACK_NORMS", "FeedbackNorm", "check_feedback_norm", "embedding_norm", "rescale"]
