"""monet_fast.kernels: the Triton kernels as a library for any training script.

Importing this package registers three torch custom ops (each a forward/backward pair under
`torch.ops.monet_fast`, see `kernels/ops.py`) and exports the typed entry points below, which
call them. The ops have fake implementations and autograd formulas, so
`torch.compile(fullgraph=True)` traces code that uses them without graph breaks, and
`torch.library.opcheck` passes on each (tests/test_custom_ops.py).

Where they run: CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before this package
is imported (slow, for tests). Elsewhere (CPU without the interpreter; float64 for the log-prob
functions) the entry points fall back to their plain-torch references (`*_reference`), which
are differentiable and compile too; the raw `torch.ops.monet_fast.*` ops raise there.

latent_attention(q, k, v, masked_rows=None, q_offset=0, kv_lens=None, scale=None) -> O
    Block-sparse attention under the Monet stage-2 mask; op `latent_attention_fwd/_bwd`.
    q [B, Hq, Sq, D], k and v [B, Hkv, Sk, D], Hq % Hkv == 0 (GQA, no repeat needed),
    fp16 / bf16 / fp32 (one dtype), D <= 256, last dim contiguous (HF's transposed views
    are fine). O has q's shape, dtype and layout; rows with no allowed key are 0.
    Differentiable in q, k, v. Softmax statistics and all accumulators are fp32 (online
    softmax in base 2); P is cast to the input dtype before the P·V and dS·K products, as in
    FlashAttention. Deterministic backward (no atomics).

gaussian_logprob(z, mu, sigma=10.0, include_constant=False) -> logp
    log N(z; mu, sigma² I) summed over the last dim: -||z - mu||² / (2 sigma²), fp32 [...]
    for z, mu [..., D] (same shape; fp32 / bf16 / fp16, may differ). Difference and sum in
    fp32 whatever the input dtypes. Differentiable in z and mu (gradients in their dtypes).

latent_policy_loss(mu, z, old_logp, advantages, mask, sigma=10.0, clip_low=0.2,
                   clip_high=0.3, *, clip_ratio_dual=3.0, return_stats=False)
    The VLPO latent term: gaussian_logprob fused with verl/EasyR1's clipped PPO/GRPO surrogate
    (ratio clamp, asymmetric clip, dual clip), per latent step; fp32 [...] loss to be reduced by
    the caller. mu, z [..., D]; old_logp, advantages, mask broadcastable to mu.shape[:-1]
    (constants; mask bool/int/float). Differentiable in mu and z; with return_stats=True also
    returns logp (differentiable, shares the backward pass: use it for a KL term), ratio and
    clip indicators (`LatentPolicyLossOutput`).

The compact mask `masked_rows`: int32 [B, L, 4], one row per key column j, (r0, r1, r2, r3)
= query rows [r0, r1) and [r2, r3) may not see key j (on top of causality). An auxiliary
image's pad column j whose latent slots are [a0, a1) is (j, a0, a1, L): the image is seen only
by its own latent slots. Padding columns are (0, L, 0, 0), all others (0, 0, 0, 0). Only the
first Sk columns are read, so a whole-sequence mask serves every chunk of a cached forward;
`q_offset` is the absolute position of query 0 (keys sit at 0..Sk-1); `kv_lens` [B] marks
right-padded keys. O(L) memory: the kernels never build the L x L mask; `dense_mask` expands
it (for SDPA and tests).

mask_from_ids(input_ids, image_pad_id, latent_start_id, latent_pad_id, attention_mask=None)
    Builds masked_rows from token ids alone (no monet_fast collate): each latent block is paired
    with the image-pad run right before it (`<|vision_end|>` between them); equal to collate's
    masked_rows on monet_fast's stage-2 rows.

With transformers, `monet_fast.model.attention.use_latent_attention(model)` switches the
language model to attn_implementation "monet_latent" and `model(..., masked_rows=mr)` passes
the mask through to the attention (examples/hf_trainer_latent_attention.py,
examples/compile_step.py).
"""

from monet_fast.kernels import ops  # noqa: F401  (registers torch.ops.monet_fast.*)
from monet_fast.kernels.gaussian_logprob import (  # noqa: F401
    LatentPolicyLossOutput,
    gaussian_logprob,
    gaussian_logprob_reference,
    latent_policy_loss,
    latent_policy_loss_reference,
)
from monet_fast.kernels.latent_attention import (  # noqa: F401
    dense_mask,
    latent_attention,
    latent_attention_reference,
)

from monet_fast.latent_mask import mask_from_ids  # noqa: F401

__all__ = [
    "LatentPolicyLossOutput",
    "dense_mask",
    "gaussian_logprob",
    "gaussian_logprob_reference",
    "latent_attention",
    "latent_attention_reference",
    "latent_policy_loss",
    "latent_policy_loss_reference",
    "mask_from_ids",
]
