"""Prompt formatting shared by the benchmark readers (eval/) and the VLPO rollouts (train/)."""

from __future__ import annotations

import string
from collections.abc import Sequence

LETTERS = string.ascii_uppercase

# The system prompt of the Monet authors' VLMEvalKit runs (README of NOVAglow646/Monet).
MONET_EVAL_SYSTEM = (
    "You are a helpful multimodal assistant. You are required to answer the question based on "
    "the image provided. Put your final answer in \\boxed{}."
)


def format_mc_question(question: str, choices: Sequence[str]) -> str:
    """The question followed by one "A. option" line per choice (our synthetic task's format)."""
    lines = [question.strip()]
    lines += [f"{LETTERS[k]}. {choice}" for k, choice in enumerate(choices)]
    return "\n".join(lines)


__all__ = ["LETTERS", "MONET_EVAL_SYSTEM", "format_mc_question"]
