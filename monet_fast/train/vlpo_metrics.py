"""VLPO metrics: the step record's rollout and objective fields, and one line per update.

The step record (`rollout_stats`, `term_stats`) sums over all rollout calls and ranks. An RL step rolls out once and then makes `updates` optimizer steps (one per mini-batch of kept
groups). Each one gets a line `{"event": "update", "step": S, "update_in_rollout": u, ...}` in
metrics.jsonl (S = the RL step as in its step record; `read_update_metrics` reads them back).
Sums run over every latent step of the update's mini-batch on all ranks, with

    logp      = -||z - mu_theta||^2 / (2 sigma^2)   current policy, z = the rollout latent
    logp_old  = the same with the pre-update weights of this RL step (the weights that rolled out)
    r         = exp(clamp(logp - logp_old, -10, 10))
    pg        = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high)), for A < 0 min(pg, -A dual)

update_in_rollout  0-based index of the optimizer step within its rollout batch. On update 0 the
                   weights are those that rolled out: r = 1 and, with the correct pairing, mu = z,
                   so the latent term's gradient is exactly 0; it acts from update 1 on.
loss               the update's objective as backpropagated (token and latent steps).
latent_loss        sum over latent steps of (pg + kl_coef * low_var_kl(logp, logp_ref)), divided by
                   N_steps (token + latent steps of the update): the latent steps' share of `loss`.
                   Its value on update 0 is -sum(A) / N_steps over latent steps (its gradient is 0).
latent_ratio_mean  mean of r over latent steps (1 on update 0).
latent_clipfrac    fraction of latent steps where the PPO clip is active, -A r < -A clamp(r, ...)
                   (verl's pg_clipfrac; the dual clip is not counted).
latent_kl          mean of (logp_old - logp) over latent steps: the k1 estimate of
                   KL(pi_old || pi_theta) at the rollout latent. With the correct pairing and
                   rollouts from the pre-update weights, z = mu_old, so it equals the exact
                   Gaussian KL ||mu_old - mu_theta||^2 / (2 sigma^2): 0 on update 0, > 0 once mu
                   moves. (Not the KL to the reference model, which is the step record's `kl`.)
latent_steps       the number of latent steps of the update.

The latent metrics are null when the update has no latent step (or `vlpo.latent_term` is off).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monet_fast.train.filtering import GroupPool
from monet_fast.train.grpo import StepTerms, summarize
from monet_fast.train.metrics import METRICS_FILE

UPDATE_EVENT = "update"
Reduce = Callable[[list[float]], list[float]]  # sums a list over ranks (same list on each rank)


def rollout_stats(pool: GroupPool, reduce: Reduce) -> dict[str, Any]:
    """Step-record fields of a step's rollouts (every call, all ranks): reward, accuracy, format,
    lengths, groups rolled out / passing the filter / kept (<= quota), the pool's calls and reason.
    """
    ros = pool.rollouts
    *sums, n_fail, n_judge_fail = reduce(
        [
            len(ros),
            sum(r.reward.reward for r in ros),
            sum(r.reward.reward**2 for r in ros),
            sum(r.reward.correct for r in ros),
            sum(r.reward.format_ok for r in ros),
            float(sum(int(r.response_ids.numel()) for r in ros)),
            sum(r.n_blocks for r in ros),
            sum(r.finish_reason == "length" for r in ros),
            pool.groups,
            pool.passed,
            len(pool.kept),
            sum(abs(r.advantage) for r in ros),
            sum(r.reward.error is not None for r in ros),
            sum(r.reward.judge == "error" for r in ros),
        ]
    )
    (n, r_sum, r_sq, n_ok, n_fmt, tok_sum, blk_sum, n_len, n_groups, n_pass, n_kept, adv_abs) = sums
    mean = r_sum / n
    return {
        "reward_mean": mean,
        "reward_std": math.sqrt(max(r_sq / n - mean**2, 0.0) * n / max(n - 1, 1)),
        "accuracy": n_ok / n,
        "format_rate": n_fmt / n,
        "response_tokens": tok_sum / n,
        "latent_blocks": blk_sum / n,
        "truncated_rate": n_len / n,
        "adv_abs_mean": adv_abs / n,
        "groups": int(n_groups),
        "groups_kept": int(n_kept),
        "group_keep_rate": n_pass / max(n_groups, 1),  # the filter's pass rate (before the quota)
        "rollout_calls": pool.calls,
        "pool_reason": pool.reason,
        "tokens": int(tok_sum),
        "prompts": int(n_groups),
        "responses": int(n),
        # Rollouts whose reward raised (reward 0, group not trained on; rewards.safe_reward) and
        # whose judge failed (rule verdict kept); both logged per sample.
        "reward_failures": int(n_fail),
        "judge_failures": int(n_judge_fail),
    }


def term_stats(terms: Sequence[StepTerms], reduce: Reduce) -> dict[str, Any]:
    """Step-record fields of the objective over every update of a step (all ranks): KL to the
    reference, clip fractions, ratios, log-probs and step counts per kind."""
    parts: dict[str, list[StepTerms]] = {"token": [], "latent": []}
    for t in terms:
        parts[t.kind].append(t)
    sums = {k: summarize(v) for k, v in parts.items()}
    fields = ("n", "logp", "kl", "clipped", "dual", "ratio")
    red = reduce([sums[k][f] for k in ("token", "latent") for f in fields])
    tn, tlogp, tkl, tclip, tdual, tratio, ln, llogp, lkl, lclip, ldual, lratio = red
    total = max(tn + ln, 1.0)
    return {
        "kl": (tkl + lkl) / total,
        "clip_frac": (tclip + lclip) / total,
        "dual_clip_frac": (tdual + ldual) / total,
        "token_clip_frac": tclip / max(tn, 1.0),
        "latent_clip_frac": lclip / max(ln, 1.0) if ln else None,
        "ratio_mean": (tratio + lratio) / total,
        "token_logp_mean": tlogp / max(tn, 1.0),
        "latent_logp_mean": llogp / ln if ln else None,
        "latent_logp_min": sums["latent"]["logp_min"] if ln else None,  # this rank's
        "ratio_max": max(sums["token"]["ratio_max"], sums["latent"]["ratio_max"]),
        "token_steps": int(tn),
        "latent_steps": int(ln),
    }


# Per-update sums, in this order: latent steps, latent loss, ratio, clipped, logp_old - logp.
_SUMS = ("n", "loss", "ratio", "clipped", "drift")


def latent_sums(terms: Sequence[StepTerms]) -> list[float]:
    """Sums over the latent steps of one update's micro-batches on this rank (see `_SUMS`);
    add them over ranks before `update_record`."""
    out = dict.fromkeys(_SUMS, 0.0)
    for t in terms:
        if t.kind != "latent" or t.logp.numel() == 0:
            continue
        out["n"] += t.logp.numel()
        out["loss"] += float(t.loss.detach().double().sum())
        out["ratio"] += float(t.ratio.double().sum())
        out["clipped"] += float(t.clipped.sum())
        # old - new in fp64 from the fp32 log-probs: near 0, where log(r) in fp32 would round.
        out["drift"] += float((t.old_logp.double() - t.logp.double()).sum())
    return [out[k] for k in _SUMS]


def update_records(
    local: Sequence[Sequence[float]], n_steps: Sequence[float], reduce: Reduce
) -> list[dict[str, Any]]:
    """The "update" lines of one RL step. local[u] = [this rank's share of update u's objective,
    *latent_sums(update u's terms on this rank)]; n_steps[u] = N_steps of update u (all ranks)."""
    width = 1 + len(_SUMS)
    red = reduce([v for row in local for v in row])
    return [
        update_record(u, red[u * width + 1 : (u + 1) * width], n_steps[u], red[u * width])
        for u in range(len(local))
    ]


def update_record(
    update_in_rollout: int, sums: Sequence[float], n_steps: float, loss: float
) -> dict[str, Any]:
    """One update's metrics from its rank-summed `latent_sums`, its N_steps (all ranks) and its
    objective (all ranks)."""
    s = dict(zip(_SUMS, sums))
    n = s["n"]
    return {
        "update_in_rollout": int(update_in_rollout),
        "loss": loss,
        "latent_loss": s["loss"] / max(n_steps, 1.0) if n else None,
        "latent_ratio_mean": s["ratio"] / n if n else None,
        "latent_clipfrac": s["clipped"] / n if n else None,
        "latent_kl": s["drift"] / n if n else None,
        "latent_steps": int(n),
    }


def read_update_metrics(path: str | os.PathLike) -> list[dict]:
    """The update lines of a metrics.jsonl (or its run directory), ordered by (step, update);
    after a resume the last line per (step, update) wins, as `read_metrics` does for steps."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    found: dict[tuple[int, int], dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("event") == UPDATE_EVENT:
            found[(rec["step"], rec["update_in_rollout"])] = rec
    return [found[k] for k in sorted(found)]


__all__ = [
    "UPDATE_EVENT",
    "latent_sums",
    "read_update_metrics",
    "rollout_stats",
    "term_stats",
    "update_record",
    "update_records",
]
