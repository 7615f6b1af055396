"""GRPO pieces of VLPO: group advantages, difficulty filter, low-variance KL, the step objective.

VLPO (REFERENCE.md §5) is GRPO in which a latent step is a Gaussian action. Every *step* of a
response is one of:

  token step   a sampled text token; logp = log_softmax(logits / T_rollout)[token]
  latent step  a latent slot; logp = -||z - mu||^2 / (2 sigma^2), z = the rollout latent,
               mu = the current policy's hidden state that generates it (fp32, fused kernel)

and both kinds enter the same clipped surrogate and KL term (reference: latent log-probs replace
token log-probs at latent positions). Written after EasyR1/verl `core_algos.py`:

  A_i     = (R_i - mean_g R) / (std_g R + eps)          unbiased std over the group (torch.std)
  r       = exp(clamp(logp - old_logp, -10, 10))
  pg      = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high)),  for A < 0: min(pg, -A dual)
  kl      = clamp(exp(k) - k - 1, -10, 10),  k = clamp(ref_logp - logp, -10, 10)   (low_var_kl)
  loss    = Σ_steps (pg + kl_coef kl) / N_steps          token-level mean over the mini-batch

`N_steps` counts token and latent steps of every sequence of the optimizer step (all
micro-batches, all ranks), so gradient accumulation gives the gradient of one big batch. (The
reference averages per micro-batch and divides by the number of micro-batches, which weights
short and long micro-batches alike; the two agree when micro-batches hold equally many steps.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from monet_fast.kernels import latent_policy_loss
from monet_fast.kernels.gaussian_logprob import policy_loss_from_logp_reference

# Reference values (RL/examples/config_monet.yaml, vlpo_train.sh; REFERENCE.md §5.3).
ADV_EPS = 1e-6
KL_LIMIT = 10.0


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor | Sequence[int], eps: float = ADV_EPS
) -> torch.Tensor:
    """GRPO outcome advantages: (R - group mean) / (group std + eps), one value per response.

    The std is unbiased (torch.std, as verl). A group whose rewards are all equal (all correct,
    all wrong) gets advantage 0 for every member; a group of one response too (torch.std of one
    value is NaN; verl would propagate it, we define it as 0).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    ids = torch.as_tensor(group_ids)
    if rewards.shape != ids.shape or rewards.ndim != 1:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(ids.shape)} must be equal 1-D"
        )
    adv = torch.zeros_like(rewards)
    for g in ids.unique().tolist():
        sel = ids == g
        r = rewards[sel]
        if r.numel() < 2:
            continue
        std = r.std()
        adv[sel] = (r - r.mean()) / (std + eps)
    return adv


def group_accuracy(correct: torch.Tensor, group_ids: torch.Tensor) -> dict[int, float]:
    """Mean correctness per group id."""
    correct = torch.as_tensor(correct, dtype=torch.float32)
    ids = torch.as_tensor(group_ids)
    return {int(g): float(correct[ids == g].mean()) for g in ids.unique().tolist()}


def keep_group(accuracy: float, low: float = 0.0, high: float = 0.6) -> bool:
    """Online difficulty filter (reference `select_acc_threshold`): keep iff low < acc <= high.

    The reference keeps prompts with at least one correct rollout and accuracy <= 0.6, i.e. the
    band (0, 0.6]; all-wrong and too-easy groups carry no (or little) learning signal.
    """
    return low < accuracy <= high + 1e-9


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """verl `compute_kl(..., "low_var_kl")` (k3 estimator), per step: 0 where logp == ref_logp."""
    kl = torch.clamp(ref_logp - logp, -KL_LIMIT, KL_LIMIT)
    return torch.clamp(torch.exp(kl) - kl - 1.0, -KL_LIMIT, KL_LIMIT)


@dataclass
class ClipConfig:
    clip_low: float = 0.2
    clip_high: float = 0.3
    clip_ratio_dual: float = 3.0


@dataclass
class StepTerms:
    """Per-step pieces of one micro-batch, flat over its steps (fp32)."""

    loss: torch.Tensor  # pg (+ kl_coef * kl), differentiable
    logp: torch.Tensor  # detached
    ratio: torch.Tensor
    clipped: torch.Tensor  # bool
    dual_clipped: torch.Tensor  # bool
    kl: torch.Tensor  # detached, zeros without a reference model
    kind: str = "token"  # token | latent
    old_logp: torch.Tensor | None = None  # detached pre-update log-probs (per-update metrics)


def token_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip: ClipConfig,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> StepTerms:
    """Clipped surrogate (+ KL) of token steps from their log-probs (differentiable in logp)."""
    out = policy_loss_from_logp_reference(
        logp,
        old_logp.detach(),
        advantages,
        torch.ones_like(logp),
        clip.clip_low,
        clip.clip_high,
        clip.clip_ratio_dual,
    )
    terms = _with_kl(out.loss, logp, out.ratio, out.clipped, out.dual_clipped, ref_logp, kl_coef)
    terms.old_logp = old_logp.detach()
    return terms


def latent_terms(
    mu: torch.Tensor,
    z: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip: ClipConfig,
    sigma: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> StepTerms:
    """Clipped surrogate (+ KL) of latent steps, log N(z; mu, sigma^2 I) by the fused kernel.

    mu: [N, H] policy means (grad); z: [N, H] rollout latents (constants). The kernel computes
    the log-prob in fp32 whatever the model dtype (the reference does it in bf16) and returns it
    as a differentiable output, so the KL term shares its backward pass.
    """
    out = latent_policy_loss(
        mu,
        z.detach(),
        old_logp.detach(),
        advantages,
        torch.ones(mu.shape[0], device=mu.device),
        sigma,
        clip.clip_low,
        clip.clip_high,
        clip_ratio_dual=clip.clip_ratio_dual,
        return_stats=True,
    )
    terms = _with_kl(
        out.loss, out.logp, out.ratio, out.clipped, out.dual_clipped, ref_logp, kl_coef
    )
    terms.kind = "latent"
    terms.old_logp = old_logp.detach()
    return terms


def _with_kl(loss, logp, ratio, clipped, dual, ref_logp, kl_coef) -> StepTerms:
    if ref_logp is not None and kl_coef:
        kl = low_var_kl(logp, ref_logp.detach().to(logp.dtype))
        loss = loss + kl_coef * kl
        kl = kl.detach()
    elif ref_logp is not None:
        kl = low_var_kl(logp.detach(), ref_logp.to(logp.dtype))
    else:
        kl = torch.zeros_like(logp.detach())
    return StepTerms(loss, logp.detach(), ratio.detach(), clipped, dual, kl)


def summarize(terms: Sequence[StepTerms]) -> dict[str, float]:
    """Sums (not means) over steps, so micro-batches and ranks can be added before dividing."""
    out = {"n": 0.0, "loss": 0.0, "logp": 0.0, "kl": 0.0, "clipped": 0.0, "dual": 0.0}
    out["ratio"] = 0.0
    out["ratio_max"] = -math.inf
    out["logp_min"] = math.inf
    for t in terms:
        n = t.logp.numel()
        if n == 0:
            continue
        out["n"] += n
        out["loss"] += float(t.loss.detach().sum())
        out["logp"] += float(t.logp.sum())
        out["kl"] += float(t.kl.sum())
        out["clipped"] += float(t.clipped.sum())
        out["dual"] += float(t.dual_clipped.sum())
        out["ratio"] += float(t.ratio.sum())
        out["ratio_max"] = max(out["ratio_max"], float(t.ratio.max()))
        out["logp_min"] = min(out["logp_min"], float(t.logp.min()))
    return out


__all__ = [
    "ADV_EPS",
    "ClipConfig",
    "StepTerms",
    "group_accuracy",
    "group_advantages",
    "keep_group",
    "latent_terms",
    "low_var_kl",
    "summarize",
    "token_terms",
]
