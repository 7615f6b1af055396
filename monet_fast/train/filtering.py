"""Online difficulty filtering with a pool of kept groups (reference `pre_generate_monet_online`,
REFERENCE.md §5.5).

An RL step trains on a quota of prompt groups (`rollout.prompts_per_step`, all ranks together)
whose accuracy lies in (acc_low, acc_high]. The first rollout call samples the step's own prompts.
While fewer groups than the quota passed the filter (all ranks together), further calls roll out
the epoch's next prompt batches, at most `filter.max_extra_rollouts` of them, and the groups that
pass are pooled. Each rank keeps at most its share of the quota (the surplus of the last call is
dropped, as the reference drops groups past its batch of 64). When the extra calls run out, or
the epoch runs out of prompts, the step trains on what was kept and says why (`reason`); the
recipe skips it if fewer than `filter.min_groups` groups were kept.

The reference pools 256 prompts (4 calls of 64) and skips the chunk when fewer than 64 survive;
here a step keeps what it has. Every rank makes the same calls (the decision uses sums over
ranks), since a rollout may run collectives (ZeRO-3 gathers the weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from monet_fast.train import grpo
from monet_fast.train.rollout import Rollout

QUOTA_MET = "quota met"


@dataclass
class GroupPool:
    """The kept groups of one RL step on this rank, and how they were found."""

    quota: int  # this rank's share of the step's groups
    kept: list[list[Rollout]] = field(default_factory=list)  # groups to train on, <= quota
    rollouts: list[Rollout] = field(default_factory=list)  # every rollout of every call
    groups: int = 0  # groups rolled out on this rank
    passed: int = 0  # groups that passed the filter on this rank (before the quota cut)
    calls: int = 0  # rollout calls made (1 + extra)
    reason: str = ""  # QUOTA_MET, or why the pool stopped short


def filter_groups(rollouts: list[Rollout], f: Any, adv_eps: float) -> tuple[list, int]:
    """Set each rollout's GRPO advantage (within its group); return (the groups that pass the
    difficulty filter `f` (a FilterSection), in group order, and the number of groups)."""
    if not rollouts:
        return [], 0
    rewards = torch.tensor([r.reward.reward for r in rollouts], dtype=torch.float32)
    ids = torch.tensor([r.group for r in rollouts])
    adv = grpo.group_advantages(rewards, ids, adv_eps)
    for r, a in zip(rollouts, adv.tolist()):
        r.advantage = a
    acc = grpo.group_accuracy(torch.tensor([r.reward.correct for r in rollouts]), ids)
    groups: dict[int, list[Rollout]] = {}
    for r in rollouts:
        groups.setdefault(r.group, []).append(r)
    # A group with a failed reward (`RewardResult.error`, see rewards.safe_reward) is never
    # trained on: its placeholder 0 would skew the other members' advantages.
    passing = [
        g
        for gid, g in groups.items()
        if not any(r.reward.error for r in g)
        and (not f.enabled or grpo.keep_group(acc[gid], f.acc_low, f.acc_high))
    ]
    return passing, len(groups)


def pool_groups(
    roll: Callable[[int], list[Rollout] | None],
    *,
    quota: int,
    f: Any,
    adv_eps: float,
    reduce: Callable[[list[float]], list[float]],
) -> GroupPool:
    """Roll out until the step's quota of kept groups is met on all ranks, or give up.

    roll(call): the rollouts (rewards set) of call 0, 1, ...; None when no prompts are left.
    quota: this rank's groups per step. f: the FilterSection (enabled, acc_low, acc_high,
    max_extra_rollouts). reduce: sums a list of floats over ranks (identity on one process).
    """
    pool = GroupPool(quota=quota)
    while True:
        rollouts = roll(pool.calls)
        if rollouts is None:
            pool.reason = f"gave up: the epoch has no more prompts after {pool.calls} rollout calls"
            break
        pool.calls += 1
        passing, n_groups = filter_groups(rollouts, f, adv_eps)
        pool.rollouts += rollouts
        pool.groups += n_groups
        pool.passed += len(passing)
        pool.kept += passing[: max(quota - len(pool.kept), 0)]
        missing, total = reduce([quota - len(pool.kept), quota])
        if missing == 0:
            pool.reason = QUOTA_MET
            break
        if pool.calls > f.max_extra_rollouts:
            pool.reason = (
                f"gave up: {int(total - missing)} of {int(total)} groups kept after "
                f"{f.max_extra_rollouts} extra rollout calls (filter.max_extra_rollouts)"
            )
            break
    return pool


__all__ = ["QUOTA_MET", "GroupPool", "filter_groups", "pool_groups"]
