"""Loss pieces shared by the batched latent forward and the two-pass reference.

Normalisation is explicit: every loss comes as a (sum, normaliser) pair so a trainer can
divide by the total over all gradient-accumulation micro-batches, not per micro-batch.
  - CE: sum over target tokens of weight·ce, normalised by the sum of weights (observation
    tokens weigh `obs_weight`, others 1) — the reference's weighted mean, token-level.
  - Alignment: per sample, mean over layers × positions of (1 − cos); averaged over samples
    (the reference's `.mean()` per sample then batch mean). The cosine runs over the hidden axis
    by default; `align_cosine="reference"` reproduces the reference's cosine over the position
    axis (see `alignment_per_sample`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from monet_fast.model.chunked_ce import head_cross_entropy

# Reference values (REFERENCE.md §2-4): observation CE factor 2.0 in stage 1, 4.0 in stages
# 2 and 3; alignment weight 2.0; stage 2 routes alignment through the latents with weight 2.0.
DEFAULT_OBS_WEIGHT = {"stage1": 2.0, "stage2": 4.0, "stage3": 4.0, "infer": 1.0}

# Which axis the alignment cosine runs over (`alignment_per_sample`).
ALIGN_COSINES: tuple[str, ...] = ("hidden", "reference")


@dataclass
class LossConfig:
    """Loss weights. None means the reference's value for the stage."""

    obs_weight: float | None = None
    align_weight: float = 2.0
    # Stage 2 only: the alignment gradient reaches the parameters only through the latent
    # vectors, scaled by this factor (the reference's `emphasize_latent_weight`).
    latent_proxy_weight: float = 2.0
    # "hidden" (default) | "reference": the axis of the alignment cosine, see alignment_per_sample.
    align_cosine: str = "hidden"
    # Rows per chunk of the chunked linear + CE (`chunked_ce`: no [N, V] logits); 0 = plain.
    ce_chunk_size: int = 0

    def obs_weight_for(self, stage: str) -> float:
        return DEFAULT_OBS_WEIGHT[stage] if self.obs_weight is None else self.obs_weight

    def __post_init__(self) -> None:
        for name in ("obs_weight", "align_weight", "latent_proxy_weight"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.ce_chunk_size < 0:
            raise ValueError(f"ce_chunk_size must be >= 0 (0 = plain CE), got {self.ce_chunk_size}")
        _check_cosine(self.align_cosine)


def _check_cosine(cosine: str) -> None:
    if cosine not in ALIGN_COSINES:
        raise ValueError(f"align_cosine must be one of {list(ALIGN_COSINES)}, got {cosine!r}")


def weighted_ce_sum(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·ce, Σ w) over rows. logits [N, V] (upcast to fp32 here, unlike the reference's bf16
    CE, because the sum of thousands of bf16 terms loses the small per-token differences)."""
    if logits.shape[0] == 0:
        zero = logits.new_zeros((), dtype=torch.float32)
        return zero + logits.sum() * 0, zero
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    weights = weights.to(ce.dtype)
    return (ce * weights).sum(), weights.sum()


def head_weighted_ce_sum(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·ce, Σ w) of `head(hidden)` [N, H] against targets, fp32. chunk_size > 0: chunked
    linear + CE (`chunked_ce.head_cross_entropy`, no [N, V] logits); 0: as `weighted_ce_sum`."""
    if hidden.shape[0] == 0 or not chunk_size:
        return weighted_ce_sum(head(hidden), targets, weights)
    ce = head_cross_entropy(head, hidden, targets, chunk_size=chunk_size)
    weights = weights.to(ce.dtype)
    return (ce * weights).sum(), weights.sum()


def alignment_per_sample(
    teacher: torch.Tensor, student: torch.Tensor, cosine: str = "hidden"
) -> torch.Tensor:
    """One sample's alignment loss, mean of 1 − cos over [layers, positions, hidden] states (fp32).

    cosine="hidden" (default): cos(teacher[l, p], student[l, p]) between hidden vectors, then the
      mean over layers × positions — the evident intent of the reference.
    cosine="reference": exactly what the reference computes,
      `(1 - F.cosine_similarity(teacher, student)).mean()` without `dim`, i.e. torch's default
      dim=1, the POSITION axis of these 3-D tensors: cos(teacher[l, :, d], student[l, :, d]) per
      (layer, hidden unit) over the positions, then the mean over layers × hidden units. The
      released checkpoints were trained with it. With a single position each cosine is
      sign(t·s), so its gradient is zero.
    An empty sample (no positions) gives 0 (the trainers skip it when averaging over samples;
    the reference drops such samples when it reads the data).
    """
    _check_cosine(cosine)
    if teacher.dim() != 3:
        raise ValueError(
            f"alignment states must be [layers, positions, hidden], got {tuple(teacher.shape)}"
        )
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher states {tuple(teacher.shape)} do not match student states "
            f"{tuple(student.shape)} ([layers, positions, hidden])"
        )
    if teacher.numel() == 0:
        return student.sum() * 0
    # fp32 (the reference runs the cosine in bf16; its sums over thousands of terms round).
    cos = F.cosine_similarity(teacher.float(), student.float(), dim=-1 if cosine == "hidden" else 1)
    return (1.0 - cos).mean()


class LatentGate(torch.autograd.Function):
    """Identity on a latent vector whose backward can be switched off.

    Stage 2 needs g = ∂L_align/∂latents holding the *other* latents fixed (the reference gets
    it because its second pass sees the latents as leaves). In a one-pass graph a later latent
    depends on earlier ones, so autograd.grad would also follow those chains; closing every gate
    during that call stops the gradient at each latent, which gives exactly the partials.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: dict) -> torch.Tensor:
        ctx.state = state
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None if ctx.state["closed"] else grad), None


def latent_proxy_loss(
    align_loss: torch.Tensor,
    gated_latents: list[torch.Tensor],
    gate_state: dict,
    align_weight: float,
    proxy_weight: float,
) -> torch.Tensor:
    """The reference's `compute_latents_only_loss`: Σ v·g.detach() with g = ∂(w·L_align)/∂v.

    Its gradient w.r.t. any parameter is L_align's gradient restricted to paths through the
    latent vectors (times proxy_weight); its value is meaningless, so callers add
    `proxy − proxy.detach()` to the reported loss.
    """
    used = [v for v in gated_latents if v.requires_grad]
    if not used or not align_loss.requires_grad or proxy_weight == 0 or align_weight == 0:
        return align_loss.new_zeros(())
    gate_state["closed"] = True
    try:
        grads = torch.autograd.grad(
            align_weight * align_loss, used, retain_graph=True, allow_unused=True
        )
    finally:
        gate_state["closed"] = False
    proxy = align_loss.new_zeros(())
    for v, g in zip(used, grads):
        if g is not None:
            proxy = proxy + (v * g.detach()).sum()
    return proxy_weight * proxy


def stage_loss(
    stage: str,
    ce_loss: torch.Tensor,
    student: list[torch.Tensor] | None,
    teacher: list[torch.Tensor] | None,
    cfg: LossConfig,
    gated_latents: list[torch.Tensor],
    gate_state: dict,
    keys: list[str],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """The stage objective from the CE and the all-layer student states at the aligned positions
    (observation tokens in stage 2, latent slots in stage 3).

    Returns (loss, align_loss, align_sum, align_count). Stage 2 routes the alignment gradient
    through the latents only (`latent_proxy_loss`); stage 3 back-propagates it normally.
    """
    align_sum = ce_loss.new_zeros(())
    if teacher is None or stage not in ("stage2", "stage3"):
        return ce_loss, None, align_sum, 0
    what = "observation tokens" if stage == "stage2" else "latent slots"
    align_count = 0
    for key, tgt, stu in zip(keys, teacher, student):
        tgt = tgt.to(stu.device)
        if tgt.shape[:2] != stu.shape[:2]:
            raise ValueError(
                f"sample {key}: teacher has {tgt.shape[1]} positions and {tgt.shape[0]} layers, "
                f"the student sequence has {stu.shape[1]} {what} and {stu.shape[0]} layers"
            )
        if tgt.shape[1] == 0:
            continue
        align_sum = align_sum + alignment_per_sample(tgt, stu, cfg.align_cosine)
        align_count += 1
    align_loss = align_sum / max(align_count, 1)
    if stage == "stage2" and cfg.latent_proxy_weight > 0:
        proxy = latent_proxy_loss(
            align_loss, gated_latents, gate_state, cfg.align_weight, cfg.latent_proxy_weight
        )
        # Value: the true weighted objective; gradient: CE + the latent-routed alignment.
        loss = ce_loss + (proxy - proxy.detach()) + (cfg.align_weight * align_loss).detach()
    else:
        loss = ce_loss + cfg.align_weight * align_loss
    return loss, align_loss, align_sum, align_count
