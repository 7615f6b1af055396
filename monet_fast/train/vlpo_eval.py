"""Held-out reward evaluation of a policy (VLPO's `eval` section, and usable on any model)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from monet_fast.train.engine_setup import _all_reduce_sum
from monet_fast.train.prompts import load_prompts, prepare_prompt
from monet_fast.train.rewards import MonetReward, safe_reward
from monet_fast.train.rollout import BanTokens

if TYPE_CHECKING:
    from monet_fast.train.vlpo_config import RLConfig


def evaluate_rewards(
    model,
    processor,
    samples: list,
    reward_fn: MonetReward,
    *,
    samples_per_prompt: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    latent_size: int | None = None,
    latent_layout: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    ban: BanTokens | None = None,
    use_cuda_graphs: bool = True,
) -> dict[str, float]:
    """Rewards of the model on prompts: greedy (temperature 0) or sampled; sums and counts. A
    response whose reward raises counts as reward 0, wrong, and in `failures` (logged)."""
    from monet_fast.decode import generate
    from monet_fast.model.config import get_latent_config
    from monet_fast.train.rewards import RolloutInfo
    from monet_fast.train.rollout import prompt_input

    k = latent_size or get_latent_config(model).latent_size
    jobs = [s for s in samples for _ in range(samples_per_prompt)]
    out = {"n": 0.0, "reward_sum": 0.0, "correct_sum": 0.0, "format_sum": 0.0, "failures": 0.0}
    was_training = model.training
    model.eval()
    try:
        for c in range(math.ceil(len(jobs) / batch_size)):
            chunk = jobs[c * batch_size : (c + 1) * batch_size]
            sampling = temperature > 0
            gen = generate(
                model,
                processor,
                [prompt_input(s) for s in chunk],
                max_new_tokens=max_new_tokens,
                latent_size=k,
                latent_layout=latent_layout or get_latent_config(model).latent_layout,
                do_sample=sampling,
                temperature=temperature if sampling else 1.0,
                top_p=top_p if sampling else 1.0,
                seed=seed + c,
                use_cuda_graphs=use_cuda_graphs,
                logits_processor=ban,
            )
            for s, text, ids, why in zip(chunk, gen.texts, gen.sequences, gen.finish_reasons):
                res = safe_reward(reward_fn, text, s, RolloutInfo(int(ids.numel()), 0, why))
                out["n"] += 1
                out["reward_sum"] += res.reward
                out["correct_sum"] += float(res.correct)
                out["format_sum"] += float(res.format_ok)
                out["failures"] += float(res.error is not None)  # counted as reward 0
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def evaluate_on_ranks(
    model,
    processor,
    reward_fn: MonetReward,
    cfg: RLConfig,
    *,
    rank: int,
    world: int,
    device: torch.device,
    latent_size: int,
    latent_layout: str,
    ban: BanTokens | None,
    use_cuda_graphs: bool,
) -> dict[str, float]:
    """Mean reward / accuracy / format rate on the held-out prompts (cfg.eval.data), each rank
    taking every world-th prompt; the sums are reduced over ranks (every rank gets the means)."""
    ev, r = cfg.eval, cfg.rollout
    samples, _ = load_prompts(ev.data)
    mine = [prepare_prompt(s, ev.data.image_budget, r.prompt_suffix) for s in samples[rank::world]]
    res = evaluate_rewards(
        model,
        processor,
        mine,
        reward_fn,
        samples_per_prompt=ev.samples_per_prompt,
        temperature=ev.temperature,
        top_p=r.top_p,
        max_new_tokens=ev.max_new_tokens or r.max_new_tokens,
        latent_size=latent_size,
        latent_layout=latent_layout,
        seed=cfg.seed + 1,
        batch_size=r.batch_size,
        ban=ban,
        use_cuda_graphs=use_cuda_graphs,
    )
    n, rew, ok, fmt, fail = _all_reduce_sum(
        [res["n"], res["reward_sum"], res["correct_sum"], res["format_sum"], res["failures"]],
        device,
    )
    return {
        "eval_reward": rew / max(n, 1.0),
        "eval_accuracy": ok / max(n, 1.0),
        "eval_format_rate": fmt / max(n, 1.0),
        "eval_n": int(n),
        "eval_reward_failures": int(fail),
    }


__all__ = ["evaluate_on_ranks", "evaluate_rewards"]
