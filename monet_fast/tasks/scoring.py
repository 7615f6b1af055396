"""Per-item scoring: the rule verdict, then (only for rule-wrong items) an optional LLM judge.

The LLM judge (`monet_fast.tasks.judge.OpenAIJudge`, or any `fn(question, prediction, gold) ->
bool`) is off by default. A judge that fails on an item (any exception: `JudgeError` after its
retries, or an error of a plain-callable judge) is logged with the sample id, leaves the rule
verdict -- so the item counts as WRONG, never dropped: dropping only rule-wrong items would
inflate accuracy -- and marks the item `judge="error"`; reports count these as
`judge_failures`. One flaky request must not end a multi-hour evaluation or a training run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from monet_fast.data.types import Sample
from monet_fast.tasks.answers import (
    answers_match,
    clean_prediction,
    extract_answer_text,
    extract_choice,
    gold_letter,
)
from monet_fast.tasks.judge import OpenAIJudge
from monet_fast.tasks.prompts import LETTERS

logger = logging.getLogger(__name__)


@dataclass
class ScoredItem:
    """One scored prediction. `correct` is the final verdict (rules, then judge if asked)."""

    sample_id: str
    correct: bool
    category: str | None = None
    prediction: str = ""
    extracted: str | None = None  # the letter / answer text the rules read
    gold: str = ""
    rule_correct: bool = False
    judge: str | None = None  # None: not asked; "correct", "wrong" or "error"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def question_text(sample: Sample) -> str:
    """The text segments of a sample's question, joined (what a judge is shown)."""
    return "\n".join(s.text for s in sample.question if s.kind == "text").strip()


def score_item(
    prediction_text: str, sample: Sample, judge: OpenAIJudge | None = None
) -> ScoredItem:
    """Score one prediction; the judge (if any) is asked only when the rules say wrong."""
    if sample.choices:
        extracted = extract_choice(prediction_text, len(sample.choices), sample.choices)
        gold = gold_letter(sample)
        rule_ok = extracted == gold
    else:
        extracted = extract_answer_text(prediction_text)
        gold = sample.answer
        rule_ok = answers_match(extracted, gold)
    item = ScoredItem(
        sample_id=sample.sample_id,
        correct=rule_ok,
        category=sample.category,
        prediction=prediction_text,
        extracted=extracted,
        gold=gold,
        rule_correct=rule_ok,
    )
    if judge is not None and not rule_ok:
        gold_text = gold
        if sample.choices:
            gold_text = f"{gold}. {sample.choices[LETTERS.index(gold)]}"
        try:
            verdict = bool(
                judge(question_text(sample), clean_prediction(prediction_text), gold_text)
            )
        except Exception as err:  # noqa: BLE001 (any judge failure: keep the rule verdict)
            logger.warning(
                "judge failed on sample %r (rule verdict kept: wrong): %s: %s",
                sample.sample_id,
                type(err).__name__,
                err,
            )
            item.judge = "error"
        else:
            item.judge = "correct" if verdict else "wrong"
            item.correct = verdict
    return item


def score_predictions(
    predictions: Sequence[str], samples: Sequence[Sample], judge: OpenAIJudge | None = None
) -> list[ScoredItem]:
    """`score_item` over aligned predictions and samples."""
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    return [score_item(p, s, judge) for p, s in zip(predictions, samples)]


__all__ = ["ScoredItem", "question_text", "score_item", "score_predictions"]
