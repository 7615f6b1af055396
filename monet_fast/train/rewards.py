"""VLPO rewards: rule-based by default, pluggable, with an optional (never required) LLM judge.

The reference reward (`RL/examples/reward_function/monet_reward_function.py`, REFERENCE.md §5.4):

    overall = 0.9 * correct + 0.1 * format,   format = 1 if the response has a \\boxed{...}

Its correctness check asks a Gemini/DeepSeek API whenever the rules say "wrong". Here the rules
of `monet_fast.tasks.answers` decide by default (multiple-choice letter, `\\boxed{}` content,
normalised exact match, numeric equality); `OpenAIJudge` can be added for the rule-wrong items
through any OpenAI-compatible endpoint, and a judge failure keeps the rule verdict (it never
stops training). The reference's −1 "repetitive" verdict (API only) and its length penalty
(inactive in its first epoch) are not reproduced.

Format rules (`format_rule`):
  boxed         a `\\boxed{...}` anywhere in the response (the reference's rule)
  latent_boxed  additionally at least one latent block, every latent block closed, and a
                parsable final answer (an option letter for multiple choice)

Failures never stop training. A judge failure keeps the rule verdict (`judge="error"`, counted
as `judge_failures` in the step record). Any other exception while computing one response's
reward (a plug-in function, the rules on odd text) is caught by `safe_reward`, logged with the
sample id, and gives a `RewardResult` with `error` set (reward 0, wrong, no format) that the
step record counts as `reward_failures`; the recipe then drops that response's whole GRPO group
from the update (`filtering.filter_groups`): a made-up 0 inside a group would hand the other
responses an advantage they did not earn.

Extra reward functions plug in by dotted path (`"my_pkg.rewards:brevity"`) or as callables:
`fn(text: str, sample: Sample, info: RolloutInfo) -> float`, added with a weight.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from monet_fast.data.types import Sample
from monet_fast.model.tokens import LATENT_END, LATENT_START
from monet_fast.tasks import answers, scoring
from monet_fast.tasks.judge import OpenAIJudge

logger = logging.getLogger(__name__)

FORMAT_RULES: tuple[str, ...] = ("boxed", "latent_boxed")

# The reference's format check: a complete box with non-greedy content.
_BOXED = re.compile(r"\\boxed\{.*?\}", re.DOTALL)


@dataclass
class RolloutInfo:
    """What a reward function may look at besides the text and the sample."""

    n_tokens: int = 0  # generated tokens, latent steps included
    n_latent_blocks: int = 0  # complete latent blocks
    finish_reason: str = "eos"  # eos | stop | length


@dataclass
class RewardResult:
    """One response's reward and the parts it is made of (logged per step)."""

    reward: float
    correct: bool
    format_ok: bool
    judge: str | None = None  # None (not asked), "correct", "wrong" or "error"
    parts: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # set when the reward could not be computed (see safe_reward)


RewardFn = Callable[[str, Sample, RolloutInfo], float]


def has_boxed(text: str) -> bool:
    """The reference's format test: `re.search(r"\\\\boxed\\{.*?\\}", response)`."""
    return _BOXED.search(text) is not None


def latent_blocks_well_formed(text: str) -> bool:
    """At least one latent block, and every `<abs_vis_token>` closed before the next opens."""
    depth, blocks = 0, 0
    for m in re.finditer(re.escape(LATENT_START) + "|" + re.escape(LATENT_END), text):
        if m.group(0) == LATENT_START:
            if depth:
                return False
            depth = 1
        else:
            if not depth:
                return False
            depth = 0
            blocks += 1
    return depth == 0 and blocks > 0


def latent_block_bonus(text: str, sample: Sample, info: RolloutInfo) -> float:
    """Example pluggable reward: 1 for at least one latent block, all closed, else 0
    (`reward.functions: [{name: "monet_fast.train.rewards:latent_block_bonus", weight: 0.1}]`)."""
    return float(latent_blocks_well_formed(text))


def format_ok(text: str, sample: Sample, rule: str = "boxed") -> bool:
    """Whether a response is well formed under `rule` (see the module docstring)."""
    if rule not in FORMAT_RULES:
        raise ValueError(f"format rule must be one of {list(FORMAT_RULES)}, got {rule!r}")
    boxed = has_boxed(answers.clean_prediction(text))
    if rule == "boxed":
        return boxed
    if not boxed or not latent_blocks_well_formed(text):
        return False
    if sample.choices:
        return answers.extract_choice(text, len(sample.choices), sample.choices) is not None
    return bool(answers.extract_boxed(answers.clean_prediction(text)))


def resolve_reward_fn(spec: str | RewardFn) -> RewardFn:
    """A callable from `"package.module:function"` (or a callable, returned as is)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"a reward function must be 'package.module:function' or a callable, got {spec!r}"
        )
    module, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load reward function {spec!r}: {err}") from err
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn


class MonetReward:
    """`correct_weight · correct + format_weight · format + Σ weight_i · fn_i(...)`.

    Args:
        correct_weight, format_weight: reference 0.9 and 0.1.
        format_rule: "boxed" (reference) or "latent_boxed".
        extra: (function or dotted path, weight) pairs added to the reward.
        judge: an `OpenAIJudge` (or any `fn(question, prediction, gold) -> bool` raising
            `monet_fast.tasks.judge.JudgeError` on failure) asked only when the rules say wrong; None = rules only.
    """

    def __init__(
        self,
        correct_weight: float = 0.9,
        format_weight: float = 0.1,
        format_rule: str = "boxed",
        extra: Sequence[tuple[str | RewardFn, float]] = (),
        judge: Any = None,
    ) -> None:
        if format_rule not in FORMAT_RULES:
            raise ValueError(
                f"format_rule must be one of {list(FORMAT_RULES)}, got {format_rule!r}"
            )
        self.correct_weight = float(correct_weight)
        self.format_weight = float(format_weight)
        self.format_rule = format_rule
        self.extra = [(resolve_reward_fn(fn), float(w)) for fn, w in extra]
        self.judge = judge

    def __call__(self, text: str, sample: Sample, info: RolloutInfo | None = None) -> RewardResult:
        info = info or RolloutInfo()
        item = scoring.score_item(text, sample, self.judge)
        fmt = format_ok(text, sample, self.format_rule)
        parts = {"correct": float(item.correct), "format": float(fmt)}
        reward = self.correct_weight * parts["correct"] + self.format_weight * parts["format"]
        for fn, weight in self.extra:
            value = float(fn(text, sample, info))
            parts[getattr(fn, "__name__", "extra")] = value
            reward += weight * value
        return RewardResult(
            reward=reward, correct=bool(item.correct), format_ok=fmt, judge=item.judge, parts=parts
        )


def safe_reward(
    reward_fn: Callable[[str, Sample, RolloutInfo], RewardResult],
    text: str,
    sample: Sample,
    info: RolloutInfo,
) -> RewardResult:
    """`reward_fn(text, sample, info)`, or a failed `RewardResult` (reward 0, `error` set) if it
    raises: logged with the sample id and the error, so one bad sample never ends a run."""
    try:
        return reward_fn(text, sample, info)
    except Exception as err:  # noqa: BLE001 (any failure of one sample's reward is survivable)
        error = f"{type(err).__name__}: {err}"
        logger.warning(
            "reward failed on sample %r (reward 0, counted): %s", sample.sample_id, error
        )
        return RewardResult(reward=0.0, correct=False, format_ok=False, error=error)


def build_judge(
    base_url: str | None,
    model: str | None,
    *,
    api_key_env: str | None = "OPENAI_API_KEY",
    timeout: float = 30.0,
    retries: int = 2,
) -> OpenAIJudge | None:
    """An `OpenAIJudge` when a base URL is configured, else None (the default: no service)."""
    if not base_url:
        return None
    if not model:
        raise ValueError("reward.judge.base_url is set but reward.judge.model is not")
    try:
        return OpenAIJudge(
            base_url, model, api_key_env=api_key_env, timeout=timeout, retries=retries
        )
    except ValueError as err:  # e.g. a key refused over plain http: name the config section
        raise ValueError(f"reward.judge: {err}") from None


__all__ = [
    "FORMAT_RULES",
    "MonetReward",
    "RewardFn",
    "RewardResult",
    "RolloutInfo",
    "build_judge",
    "format_ok",
    "has_boxed",
    "latent_block_bonus",
    "latent_blocks_well_formed",
    "resolve_reward_fn",
    "safe_reward",
]
