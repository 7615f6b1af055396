"""The module DeepSpeed wraps in VLPO: one micro-batch's share of the clipped token + latent
surrogate with the KL term (`VLPOTrainModule`), and the frozen per-step log-probs it is compared
with (`score_steps`: the reference model, or the policy before the update)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from monet_fast.train import grpo
from monet_fast.train.rollout import BanTokens, ReplayBatch, step_logprobs
from monet_fast.train.vlpo_config import ObjectiveSection


@dataclass
class StepScores:
    """Frozen per-step log-probs of one micro-batch (reference model, or the pre-update policy)."""

    token: torch.Tensor
    latent: torch.Tensor


@torch.no_grad()
def score_steps(
    model,
    replay: ReplayBatch,
    *,
    temperature: float,
    sigma: float,
    ban: BanTokens | None,
    ce_chunk_size: int = 0,
) -> StepScores:
    """Per-step log-probs without gradient: tokens by log-softmax, latents by the fused kernel."""
    from monet_fast.kernels import gaussian_logprob

    lp = step_logprobs(model, replay, temperature=temperature, ban=ban, ce_chunk_size=ce_chunk_size)
    z = replay.lat_z.to(lp.mu.device)
    lat = (
        gaussian_logprob(z, lp.mu, sigma) if z.numel() else lp.mu.new_zeros(0, dtype=torch.float32)
    )
    return StepScores(token=lp.token_logp.float(), latent=lat.float())


class VLPOTrainModule(nn.Module):
    """`engine(replay, old, ref, scale=...)` -> the micro-batch's share of the step objective.

    old: pre-update log-probs (None = this forward's own, detached: ratio exactly 1, the
    on-policy case of one optimizer step per rollout batch). ref: reference log-probs (None = no
    KL). scale = world_size / N_steps of the whole optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: ObjectiveSection,
        temperature: float,
        ban: BanTokens | None,
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.temperature = temperature
        self.ban = ban
        self.clip = grpo.ClipConfig(
            objective.clip_low, objective.clip_high, objective.clip_ratio_dual
        )

    def forward(
        self,
        replay: ReplayBatch,
        old: StepScores | None = None,
        ref: StepScores | None = None,
        *,
        scale: float = 1.0,
    ) -> dict[str, Any]:
        from monet_fast.kernels import gaussian_logprob

        o = self.objective
        device = self.model.device
        lp = step_logprobs(
            self.model,
            replay,
            temperature=self.temperature,
            ban=self.ban,
            ce_chunk_size=self.objective.ce_chunk_size,
        )
        tok_adv, lat_adv = (a.to(device) for a in replay.advantages())
        kl_coef = o.kl_coef if ref is not None else 0.0
        tok = grpo.token_terms(
            lp.token_logp,
            old.token.to(device) if old is not None else lp.token_logp.detach(),
            tok_adv,
            self.clip,
            ref.token.to(device) if ref is not None else None,
            kl_coef,
        )
        terms = [tok]
        objective = tok.loss.sum()
        if o.latent_term and replay.n_latent_steps:
            z = replay.lat_z.to(device)
            old_lat = (
                old.latent.to(device)
                if old is not None
                else gaussian_logprob(z, lp.mu.detach(), o.sigma)
            )
            lat = grpo.latent_terms(
                lp.mu,
                z,
                old_lat,
                lat_adv,
                self.clip,
                o.sigma,
                ref.latent.to(device) if ref is not None else None,
                kl_coef,
            )
            terms.append(lat)
            objective = objective + lat.loss.sum()
        return {"objective": objective * scale, "terms": terms}


__all__ = ["StepScores", "VLPOTrainModule", "score_steps"]
