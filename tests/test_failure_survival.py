"""One sample's judge or reward failure never ends an evaluation or a VLPO run: it is logged with
the sample id, counted (`judge_failures` in the eval report, `reward_failures` / `judge_failures`
in the VLPO step record) and scored as documented -- eval: the rule verdict (wrong) is kept;
VLPO: the failed response's group is not trained on."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from judge_stub import StubJudge, mc_sample

from monet_fast.data import make_samples
from monet_fast.eval.runner import EvalConfig, evaluate
from monet_fast.model import tiny_model
from monet_fast.tasks.judge import OpenAIJudge
from monet_fast.tasks.scoring import score_predictions
from monet_fast.train.filtering import filter_groups
from monet_fast.train.rewards import MonetReward, RewardResult, RolloutInfo, safe_reward
from monet_fast.train.rollout import Rollout
from monet_fast.train.vlpo_metrics import rollout_stats

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------- eval


def test_eval_run_survives_a_judge_500_on_one_sample(tmp_path, caplog):
    model, processor = tiny_model(seed=0, latent_size=3)
    samples = make_samples(3, seed=7)
    # The random tiny model answers wrongly, so every item goes to the judge: the first request
    # fails (500, no retry), the others say yes.
    with StubJudge([("status", 500)]) as stub:
        judge = OpenAIJudge(stub.url, "m", api_key_env=None, retries=0)
        cfg = EvalConfig(batch_size=3, max_new_tokens=4, progress=False, judge=judge)
        with caplog.at_level(logging.WARNING):
            report = evaluate(model, processor, samples, cfg, out_dir=tmp_path)
    assert len(stub.requests) == 3
    run = report["interventions"]["none"]
    items = report["predictions"]["none"]
    (failed,) = [i for i in items if i["judge"] == "error"]
    assert report["judge_failures"] == 1 and run["judge_failures"] == 1
    # Counted wrong (its rule verdict), not dropped: n stays 3, the other two were judged right.
    assert not failed["correct"] and run["n"] == 3 and run["correct"] == 2
    assert f"'{failed['sample_id']}'" in caplog.text and "HTTP 500" in caplog.text
    assert "Judge failures: 1" in (tmp_path / "report.md").read_text()


def test_a_judge_callable_that_raises_keeps_the_rule_verdict(caplog):
    def judge(question, prediction, gold):
        if "purple" in prediction:
            raise KeyError("no verdict field")
        return True

    samples = [mc_sample("a"), mc_sample("b"), mc_sample("c")]
    with caplog.at_level(logging.WARNING):
        items = score_predictions(["\\boxed{B}", "purple?", "no idea"], samples, judge)
    assert [(i.correct, i.judge) for i in items] == [
        (True, None),
        (False, "error"),
        (True, "correct"),
    ]
    assert "'b'" in caplog.text and "KeyError" in caplog.text


# ------------------------------------------------------------------------------- VLPO, unit


def _rollout(group: int, reward: RewardResult) -> Rollout:
    return Rollout(
        sample=None,
        group=group,
        prompt="",
        response_ids=torch.zeros(3, dtype=torch.long),
        text="",
        latents=torch.zeros(0, 8),
        n_blocks=0,
        truncated_block=False,
        finish_reason="stop",
        reward=reward,
    )


def test_safe_reward_turns_an_exception_into_a_logged_failure(caplog):
    def picky(text, sample, info):
        if sample.sample_id == "bad":
            raise ZeroDivisionError("division by zero")
        return 1.0

    fn = MonetReward(extra=[(picky, 0.5)])
    ok = safe_reward(fn, "\\boxed{B}", mc_sample("good"), RolloutInfo())
    assert ok.error is None and ok.reward == pytest.approx(1.5)
    with caplog.at_level(logging.WARNING):
        bad = safe_reward(fn, "\\boxed{B}", mc_sample("bad"), RolloutInfo())
    assert (bad.reward, bad.correct, bad.format_ok) == (0.0, False, False)
    assert bad.error == "ZeroDivisionError: division by zero"
    assert "'bad'" in caplog.text and "ZeroDivisionError" in caplog.text


def test_a_failed_reward_drops_its_group_and_is_counted():
    from types import SimpleNamespace

    from monet_fast.train.filtering import GroupPool

    def res(ok, error=None, judge=None):
        return RewardResult(float(ok), ok, True, judge=judge, error=error)

    # Two groups of 4, both 1-of-4 right (passes the band); group 1 has one failed reward.
    ros = [_rollout(0, res(m == 0)) for m in range(4)]
    ros += [_rollout(1, res(m == 0, judge="error" if m == 1 else None)) for m in range(3)]
    ros += [_rollout(1, RewardResult(0.0, False, False, error="ValueError: boom"))]
    for enabled in (True, False):
        f = SimpleNamespace(enabled=enabled, acc_low=0.0, acc_high=0.6)
        passing, n_groups = filter_groups(ros, f, adv_eps=1e-6)
        assert n_groups == 2 and [g[0].group for g in passing] == [0]
    pool = GroupPool(quota=2, kept=passing, rollouts=ros, groups=2, passed=1, calls=1)
    stats = rollout_stats(pool, lambda v: list(v))
    assert (stats["reward_failures"], stats["judge_failures"], stats["groups_kept"]) == (1, 1, 1)


def test_held_out_reward_evaluation_counts_a_failure_as_reward_zero():
    from monet_fast.train.vlpo_eval import evaluate_rewards

    model, processor = tiny_model(seed=0, latent_size=3)
    samples = make_samples(3, seed=7)

    def reward(text, sample, info):
        if sample.sample_id == samples[1].sample_id:
            raise RuntimeError("judge quota exhausted")
        return RewardResult(1.0, True, True)

    out = evaluate_rewards(
        model, processor, samples, reward, max_new_tokens=4, use_cuda_graphs=False
    )
    assert (out["n"], out["failures"], out["reward_sum"], out["correct_sum"]) == (3, 1, 2.0, 2)


# ------------------------------------------------------------------------------- VLPO, recipe


def test_vlpo_step_completes_when_a_reward_raises_on_one_sample(tmp_path, caplog):
    """Two RL steps on the untrained tiny model (about 5 s on 2 cores, most of it DeepSpeed
    set-up), 4 prompts x 4 responses each. Step 1: the 6th reward raises -> the step trains on
    the other 3 groups and counts the failure. Step 2: every reward raises -> a broken reward
    function, which stops the run with a clear error instead of skipping steps in silence."""
    from monet_fast.train.metrics import read_metrics
    from monet_fast.train.rl_cli import build_rl_config
    from monet_fast.train.vlpo import VLPORecipe

    overrides = [
        "logging.progress=false",
        "model.latent_size=4",
        "data.n=8",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "rollout.max_new_tokens=8",
        "trainer.mini_batch_prompts=4",
        "trainer.micro_batch_size=16",
        "trainer.export=false",
        "trainer.max_steps=2",
        "filter.max_extra_rollouts=0",
    ]
    cfg = build_rl_config(ROOT / "configs" / "tiny" / "vlpo.yaml", overrides, output=tmp_path)
    recipe = VLPORecipe(cfg)
    recipe.setup()
    seen: list[str] = []

    def reward(text, sample, info):  # 1 of 4 right in every group; call 6 and step 2 raise
        seen.append(sample.sample_id)
        if len(seen) == 6 or len(seen) > 16:
            raise ValueError("reward service returned garbage")
        ok = len(seen) % 4 == 1
        return RewardResult(float(ok), ok, True)

    try:
        recipe.reward_fn = reward
        with caplog.at_level(logging.WARNING):
            with pytest.raises(RuntimeError, match="RL step 2: the reward failed on all 16"):
                recipe.train()
    finally:
        recipe.cleanup()
    (m,) = read_metrics(tmp_path)
    assert m["step"] == 1 and m["skipped"] == 0 and m["updates"] == 1
    assert m["reward_failures"] == 1 and m["judge_failures"] == 0 and m["responses"] == 16
    assert (m["groups"], m["groups_kept"]) == (4, 3)
    assert f"'{seen[5]}'" in caplog.text and "reward service returned garbage" in caplog.text
