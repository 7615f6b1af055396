"""Triton kernels of monet_fast (installed as `monet_fast.kernels`), each beside a torch reference.

Kernels need Triton; on a CPU-only machine run them with TRITON_INTERPRET=1 (set before import).
"""

from monet_fast.kernels.gaussian_logprob import (  # noqa: F401
    LatentPolicyLossOutput,
    gaussian_logprob,
    gaussian_logprob_reference,
    latent_policy_loss,
    latent_policy_loss_reference,
)
from monet_fast.kernels.latent_attention import dense_mask, latent_attention  # noqa: F401
