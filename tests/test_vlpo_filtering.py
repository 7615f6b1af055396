"""The online filter's pool (monet_fast/train/filtering.py) with deterministic rewards: groups
are pooled over rollout calls until the quota is met, the quota caps what is kept, the extra
calls are bounded, giving up says why, and the decision is taken on sums over ranks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from monet_fast.train.filtering import QUOTA_MET, filter_groups, pool_groups
from monet_fast.train.rewards import RewardResult
from monet_fast.train.rollout import Rollout

G = 4  # responses per group


def _filter(enabled=True, max_extra=3):
    return SimpleNamespace(enabled=enabled, acc_low=0.0, acc_high=0.6, max_extra_rollouts=max_extra)


def _call(call: int, correct_per_group: list[int]) -> list[Rollout]:
    """One rollout call: group g of the call has correct_per_group[g] right answers of G."""
    out = []
    for g, n_ok in enumerate(correct_per_group):
        for m in range(G):
            ok = m < n_ok
            out.append(
                Rollout(
                    sample=None,
                    group=call * len(correct_per_group) + g,
                    prompt="",
                    response_ids=torch.zeros(3, dtype=torch.long),
                    text="",
                    latents=torch.zeros(0, 8),
                    n_blocks=0,
                    truncated_block=False,
                    finish_reason="stop",
                    reward=RewardResult(reward=float(ok), correct=ok, format_ok=True),
                )
            )
    return out


def _roller(plan: list[list[int]]):
    """roll(call) following `plan` (correct answers per group, per call); None past the plan."""
    made = []

    def roll(call):
        if call >= len(plan):
            return None
        made.append(call)
        return _call(call, plan[call])

    return roll, made


def _one_rank(values):
    return list(values)


def test_groups_are_pooled_across_calls_until_the_quota_is_met():
    # accuracy 0 / 1 fail the (0, 0.6] band; 1 or 2 of 4 correct pass.
    plan = [[0, 1, 4, 4], [2, 0, 1, 4], [1, 1, 0, 2], [1, 1, 1, 1]]
    roll, made = _roller(plan)
    pool = pool_groups(roll, quota=4, f=_filter(), adv_eps=1e-6, reduce=_one_rank)
    assert pool.reason == QUOTA_MET and made == [0, 1, 2] and pool.calls == 3
    assert pool.groups == 12 and pool.passed == 6
    # 1 + 2 groups from calls 0 and 1, then the first passing group of call 2: the quota caps it.
    assert [g[0].group for g in pool.kept] == [1, 4, 6, 8]
    assert len(pool.rollouts) == 12 * G
    # GRPO advantages within each group: 1 of 4 correct -> +1.5 / -0.5 (unbiased std 0.5).
    adv = [r.advantage for r in pool.kept[0]]
    torch.testing.assert_close(torch.tensor(adv), torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_the_pool_gives_up_after_the_extra_calls_and_says_why():
    plan = [[0, 1, 4, 4], [2, 0, 4, 4], [0, 0, 0, 0], [1, 1, 1, 1]]
    roll, made = _roller(plan)
    pool = pool_groups(roll, quota=4, f=_filter(max_extra=2), adv_eps=1e-6, reduce=_one_rank)
    assert made == [0, 1, 2] and len(pool.kept) == 2
    assert pool.reason.startswith("gave up") and "2 of 4 groups kept after 2 extra" in pool.reason
    assert "filter.max_extra_rollouts" in pool.reason

    roll, made = _roller(plan)
    pool = pool_groups(roll, quota=4, f=_filter(max_extra=0), adv_eps=1e-6, reduce=_one_rank)
    assert made == [0] and len(pool.kept) == 1 and "after 0 extra" in pool.reason


def test_the_pool_stops_when_the_epoch_has_no_more_prompts():
    roll, made = _roller([[1, 0, 0, 0]])
    pool = pool_groups(roll, quota=4, f=_filter(), adv_eps=1e-6, reduce=_one_rank)
    assert made == [0] and pool.calls == 1 and len(pool.kept) == 1
    assert "no more prompts" in pool.reason


def test_nothing_kept_and_filter_off():
    roll, _ = _roller([[0, 4, 0, 4]] * 4)
    pool = pool_groups(roll, quota=4, f=_filter(max_extra=3), adv_eps=1e-6, reduce=_one_rank)
    assert pool.kept == [] and pool.calls == 4 and pool.passed == 0 and pool.groups == 16
    roll, made = _roller([[0, 4, 0, 4]] * 4)
    pool = pool_groups(roll, quota=4, f=_filter(enabled=False), adv_eps=1e-6, reduce=_one_rank)
    assert made == [0] and len(pool.kept) == 4 and pool.reason == QUOTA_MET


def test_the_decision_uses_the_sum_over_ranks():
    """A rank whose own quota is met keeps rolling out (collectives must match) while another
    rank misses groups, and never keeps more than its quota."""
    missing_elsewhere = iter([3, 1, 0])

    def two_ranks(values):  # this rank's (missing, quota) + the other rank's
        return [values[0] + next(missing_elsewhere), values[1] + 4]

    roll, made = _roller([[1, 1, 1, 1], [2, 2, 2, 2], [1, 2, 1, 2]])
    pool = pool_groups(roll, quota=4, f=_filter(), adv_eps=1e-6, reduce=two_ranks)
    assert made == [0, 1, 2] and pool.reason == QUOTA_MET
    assert len(pool.kept) == 4 and pool.passed == 12


def test_filter_groups_sets_advantages_and_keeps_the_band():
    ros = _call(0, [0, 1, 2, 3, 4])
    passing, n = filter_groups(ros, _filter(), 1e-6)
    assert n == 5 and [g[0].group for g in passing] == [1, 2]  # accuracy .25, .5 in (0, .6]
    assert all(r.advantage == 0.0 for r in ros[:G] + ros[-G:])  # all wrong / all right
    assert sum(r.advantage for r in ros[G : 2 * G]) == pytest.approx(0.0, abs=1e-6)
