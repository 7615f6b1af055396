"""monet_fast.tasks: what a task asks and how an answer is judged, shared by eval/ and train/.

Answer parsing and the rule verdict (`answers`), per-item scoring with an optional LLM judge
(`scoring`), the judge client (`judge`) and prompt formatting (`prompts`). It sits above data/,
model/ and decode/ and below eval/ and train/, so training never imports the evaluation package.
"""

from monet_fast.tasks.answers import (
    answers_match,
    clean_prediction,
    extract_answer_text,
    extract_boxed,
    extract_choice,
    gold_letter,
    normalize_answer,
    score,
)
from monet_fast.tasks.judge import JUDGE_PROMPT, JudgeError, OpenAIJudge
from monet_fast.tasks.prompts import LETTERS, MONET_EVAL_SYSTEM, format_mc_question
from monet_fast.tasks.scoring import ScoredItem, question_text, score_item, score_predictions

__all__ = [
    "JUDGE_PROMPT",
    "LETTERS",
    "MONET_EVAL_SYSTEM",
    "JudgeError",
    "OpenAIJudge",
    "ScoredItem",
    "answers_match",
    "clean_prediction",
    "extract_answer_text",
    "extract_boxed",
    "extract_choice",
    "format_mc_question",
    "gold_letter",
    "normalize_answer",
    "question_text",
    "score",
    "score_item",
    "score_predictions",
]
