"""Add monet_fast's fused latent policy loss to an ordinary GRPO update (as in TRL / verl).

What it shows: a training script that owns its own RL loop (rollouts, rewards, token-level GRPO
loss) and only borrows `monet_fast.kernels.latent_policy_loss` for the latent steps. A latent
step is a Gaussian action: the rollout latent z at slot p was produced by the policy's hidden
state mu at p - 1, log p(z) = -||z - mu||^2 / (2 sigma^2). Per latent step the kernel computes
that log-prob in fp32 and the clipped PPO/GRPO surrogate in one pass (forward and backward).

Here a group of G rollouts of one stage-2 prompt (the tiny model, a synthetic sample) stands
in for the RL library's rollout batch: the responses are identical token sequences with their
own latents z (old-policy means plus noise) and rewards; a real run gets all of these from its
rollout worker. mu comes from a plain HF forward with output_hidden_states=True (default
attention); the token and latent surrogates are averaged over all steps (token-level mean, as
in EasyR1/verl) and one optimizer step is taken.

Run:  python examples/grpo_latent_term.py   (CPU: a few seconds, Triton interpreter)
Prints the token, latent and total loss (0 before the step: on-policy the ratio is 1 and the
group advantages sum to 0), the same losses after the step (the total is negative: the step
improved the objective), and the largest difference of the latent term and its
gradient from the unfused torch reference (`latent_policy_loss_reference`).
"""

import os

import torch

if not torch.cuda.is_available():  # the Triton interpreter must be on before kernels import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from monet_fast.kernels import latent_policy_loss, latent_policy_loss_reference  # noqa: E402

from monet_fast.data import collate  # noqa: E402
from monet_fast.data.synthetic import make_samples  # noqa: E402
from monet_fast.model.tiny import tiny_model  # noqa: E402

SIGMA, CLIP_LOW, CLIP_HIGH = 10.0, 0.2, 0.3  # VLPO's latent scale and clip range


def grpo_surrogate(logp, old_logp, adv):
    """The library's own token-level clipped surrogate (per step, no reduction)."""
    ratio = torch.exp(torch.clamp(logp - old_logp, -10.0, 10.0))
    clipped = torch.clamp(ratio, 1.0 - CLIP_LOW, 1.0 + CLIP_HIGH)
    return torch.max(-adv * ratio, -adv * clipped)


def main(group_size: int = 4) -> dict[str, float]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = tiny_model(seed=0)
    model.to(device).train()
    batch = collate(make_samples(1, seed=1) * group_size, processor, "stage2")
    inputs = batch.to(device).model_inputs()
    labels, slots = batch.labels.to(device), batch.latent_slot_mask.to(device)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0][:group_size], device=device)
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)  # GRPO group advantages

    def policy_forward():
        out = model(**inputs, output_hidden_states=True)
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
        logp = logp.gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
        # Latent at slot p <- last hidden state (after the final norm) at p - 1.
        b, p = slots.nonzero(as_tuple=True)
        return logp, out.hidden_states[-1][b, p - 1], b

    # "Rollout": old log-probs and latents z (the old policy's means plus noise).
    with torch.no_grad():
        old_token_logp, old_mu, step_seq = policy_forward()
        z = old_mu + 0.5 * torch.randn(old_mu.shape, generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip
        old_latent_logp = -0.5 * (z - old_mu).float().square().sum(-1) / SIGMA**2

    # Update: one optimizer step on token + latent steps.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    token_logp, mu, _ = policy_forward()
    response = labels[:, 1:] != -100  # token steps (latent slots carry no label)
    token_pg = grpo_surrogate(token_logp, old_token_logp, adv[:, None])[response]
    latent_adv = adv[step_seq]  # a latent step gets its sequence's advantage
    ones = torch.ones_like(latent_adv)
    latent_pg = latent_policy_loss(mu, z, old_latent_logp, latent_adv, ones, SIGMA, CLIP_LOW, CLIP_HIGH)  # fmt: skip
    loss = (token_pg.sum() + latent_pg.sum()) / (token_pg.numel() + latent_pg.numel())

    # Check the fused term against the unfused torch reference (values and d/dmu).
    ref_pg = latent_policy_loss_reference(mu, z, old_latent_logp, latent_adv, ones, SIGMA, CLIP_LOW, CLIP_HIGH)  # fmt: skip
    (grad,) = torch.autograd.grad(latent_pg.sum(), mu, retain_graph=True)
    (ref_grad,) = torch.autograd.grad(ref_pg.sum(), mu, retain_graph=True)

    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # the same surrogates under the updated policy (their sum went down)
        token_logp, mu, _ = policy_forward()
        token_after = grpo_surrogate(token_logp, old_token_logp, adv[:, None])[response]
        latent_after = latent_policy_loss(mu, z, old_latent_logp, latent_adv, ones, SIGMA, CLIP_LOW, CLIP_HIGH)  # fmt: skip
    stats = {
        "token_steps": token_pg.numel(),
        "latent_steps": latent_pg.numel(),
        "token_loss": token_pg.mean().item(),
        "latent_loss": latent_pg.mean().item(),
        "token_loss_after": token_after.mean().item(),
        "latent_loss_after": latent_after.mean().item(),
        "loss_after": (
            (token_after.sum() + latent_after.sum()) / (token_pg.numel() + latent_pg.numel())
        ).item(),
        "loss": loss.item(),
        "latent_max_diff": (latent_pg - ref_pg).abs().max().item(),
        "latent_grad_max_diff": (grad - ref_grad).abs().max().item(),
        "latent_grad_norm": grad.norm().item(),
    }
    for k, v in stats.items():
        print(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}")
    return stats


if __name__ == "__main__":
    main()
