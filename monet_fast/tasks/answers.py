"""Answer parsing and the rule verdict: what a response's final answer is and whether it is right.

Shared by evaluation (`monet_fast.eval`) and the VLPO reward (`monet_fast.train.rewards`), so it
sits below both. A prediction is the decoded response text (special tokens kept). Rules, in order:

* Multiple choice (`sample.choices` set): `extract_choice` reads ONE option letter. A `\\boxed{}`
  answer is authoritative ("\\boxed{B}", "\\boxed{(b)}", "\\boxed{B. blue}", "\\boxed{blue}");
  without one, the last explicit phrase ("Answer: B", "the answer is (b)", "Option C is
  correct"), then a response that is or starts with a letter ("B", "(B) ...", "B. ..."), then a
  lone "(B)" marker, then a unique option-text mention. Anything ambiguous (two different
  markers, two options named, a boxed text matching nothing) gives None, which scores wrong.
  Lower-case letters count only when followed by punctuation or the end of the line, so the
  article in "the answer is a red car" is not read as option A.
* Free form: the last `\\boxed{}` content (else the text after the last "answer is"/"Answer:",
  else the whole response) is compared with the gold answer after `normalize_answer`; two
  numbers compare numerically.

Latent blocks are reduced to `<abs_vis_token><latent></abs_vis_token>` first
(`monet_fast.decode.collapse_latent_spans`, the reference's `replace_abs_vis_token_content`): the
placeholder ids decoded inside a latent block are meaningless text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from monet_fast.data.boxed import matching_brace
from monet_fast.data.types import Sample
from monet_fast.decode.text import collapse_latent_spans
from monet_fast.model.tokens import ENDOFTEXT, IM_END
from monet_fast.tasks.prompts import LETTERS

_BOXED_OPEN = re.compile(r"\\boxed\s*\{")
# \text{B}, \textbf{B}, \mathrm{B}, ... -> B (innermost first; applied until nothing changes).
_LATEX_WRAPPER = re.compile(
    r"\\(?:text|textbf|textit|textrm|texttt|mathrm|mathbf|mathit|operatorname|mbox)\s*\{([^{}]*)\}"
)
# A letter "ends" at punctuation, the end of the line, or "is correct/right/best".
_LETTER_END = r"(?=\s*(?:[.,;:!?)\]]|$)|\s+is\s+(?:the\s+)?(?:correct|right|best)\b)"
_ANSWER_PHRASE = re.compile(
    r"\b(?:final\s+answer|correct\s+answer|best\s+answer|answer|correct\s+option|best\s+option"
    r"|correct\s+choice|option|choice)\b\s*(?:is|would\s+be|should\s+be|:|=)?\s*[:\-]?\s*"
    r"(?:option\s*|choice\s*)?\(?([A-Za-z])\)?" + _LETTER_END,
    re.IGNORECASE | re.MULTILINE,
)
# Whole response is one letter ("b", "(B)", "B."), or starts with an upper-case marked letter.
_ONLY_LETTER = re.compile(r"^\s*\(?([A-Za-z])\)?\s*[.:)]?\s*$")
_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.:)])(?:\s|$)")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")
# Boxed content forms: "B", "(b)", "B.", "option B", "B. blue", "(B) blue".
_FRAGMENT_LETTER = re.compile(r"^(?:option|choice)?\s*\(?([A-Za-z])\)?\s*[.:)]?$", re.IGNORECASE)
_FRAGMENT_LEADING = re.compile(r"^(?:\(([A-Za-z])\)|([A-Z])[.:)])\s*\S")
_FREEFORM_PHRASE = re.compile(
    r"(?:answer\s+is|answer\s*:|answer\s*=)\s*(.+?)\s*(?:$|\n)", re.IGNORECASE
)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
# Punctuation to drop, except a decimal point between digits and a minus sign before a number.
_PUNCT = re.compile(r"(?!(?<=\d)\.(?=\d))(?!(?<![\w.])-(?=\d))[^\w\s]")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


# --------------------------------------------------------------------------------------------
# Text clean-up and extraction
# --------------------------------------------------------------------------------------------


def clean_prediction(text: str) -> str:
    """Response text as the rules read it: latent blocks emptied, end tokens and markdown bold
    removed, surrounding whitespace stripped."""
    text = collapse_latent_spans(text)
    for token in (IM_END, ENDOFTEXT):
        text = text.replace(token, "")
    return text.replace("**", "").strip()


def extract_boxed(text: str) -> str | None:
    """Content of the last complete top-level `\\boxed{...}` (braces balanced), stripped.

    Unlike `monet_fast.data.boxed.find_last_boxed`, which rejects malformed training data, an
    unclosed box (a response cut at max_new_tokens) is skipped rather than an error, and an
    earlier complete one is still returned. Nested boxes return the outer content.
    """
    last = None
    pos = 0
    while (match := _BOXED_OPEN.search(text, pos)) is not None:
        close = matching_brace(text, match.end() - 1)
        if close == -1:
            pos = match.end()  # unclosed: a later, complete box may still follow inside it
            continue
        last = text[match.end() : close].strip()
        pos = close + 1
    return last


def _strip_latex(text: str) -> str:
    previous = None
    while previous != text:
        previous, text = text, _LATEX_WRAPPER.sub(r"\1", text)
    return text.replace("$", "")


def normalize_answer(text: str) -> str:
    """Lower-cased, LaTeX text wrappers and `\\boxed{}` unwrapped, punctuation and the articles
    a/an/the removed, whitespace collapsed (SQuAD-style), keeping decimal points, leading minus
    signs and dropping thousands separators so that numbers survive: "The \\text{Red} car." ->
    "red car", "1,000.50" -> "1000.50", "-3" -> "-3".
    """
    boxed = extract_boxed(text)
    if boxed is not None and text.strip().startswith("\\boxed"):
        text = boxed
    text = _strip_latex(text).lower()
    text = _THOUSANDS.sub("", text)
    text = _PUNCT.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _valid(letter: str | None, n_choices: int) -> str | None:
    if letter is None:
        return None
    letter = letter.upper()
    return letter if letter in LETTERS[:n_choices] else None


def _match_option_text(text: str, choices: Sequence[str] | None) -> str | None:
    """The letter of the only option whose (normalised) text occurs in `text` as whole words."""
    if not choices:
        return None
    haystack = normalize_answer(text)
    found = {}
    for k, choice in enumerate(choices):
        needle = normalize_answer(choice)
        if needle and re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack):
            found[k] = needle
    # "light blue" mentioned also matches option "blue": keep the most specific options only.
    specific = [k for k, n in found.items() if not any(n != m and n in m for m in found.values())]
    return LETTERS[specific[0]] if len(specific) == 1 else None


def _letter_from_fragment(
    fragment: str, n_choices: int, choices: Sequence[str] | None
) -> str | None:
    """A letter from a short final answer (boxed content): "B", "(b)", "B. blue", "blue"."""
    fragment = _strip_latex(fragment).strip()
    if (m := _FRAGMENT_LETTER.match(fragment)) is not None:
        return _valid(m.group(1), n_choices)
    if (m := _FRAGMENT_LEADING.match(fragment)) is not None:
        return _valid(m.group(1) or m.group(2), n_choices)
    if choices:
        target = normalize_answer(fragment)
        exact = [k for k, c in enumerate(choices) if target and normalize_answer(c) == target]
        if len(exact) == 1:
            return LETTERS[exact[0]]
        return _match_option_text(fragment, choices)
    return None


def extract_choice(text: str, n_choices: int, choices: Sequence[str] | None = None) -> str | None:
    """The option letter ("A".."Z") a response commits to, or None if absent or ambiguous.

    Args:
        text: the response (latent blocks and special tokens are handled here).
        n_choices: number of options; letters past it are ignored.
        choices: the option texts, enabling answers given as option text ("\\boxed{blue}").
    """
    if not 1 <= n_choices <= len(LETTERS):
        raise ValueError(f"n_choices must be in [1, {len(LETTERS)}], got {n_choices}")
    if choices is not None and len(choices) != n_choices:
        raise ValueError(f"got {len(choices)} choices for n_choices={n_choices}")
    text = clean_prediction(text)
    boxed = extract_boxed(text)
    if boxed is not None:
        # The boxed answer is the model's final answer; never fish elsewhere when it is unusable.
        return _letter_from_fragment(boxed, n_choices, choices)
    for m in reversed(list(_ANSWER_PHRASE.finditer(text))):
        if (letter := _valid(m.group(1), n_choices)) is not None:
            return letter
    if (m := _ONLY_LETTER.match(text)) is not None:
        return _valid(m.group(1), n_choices)
    if (m := _LEADING_LETTER.match(text)) is not None:
        # An out-of-range leading letter ("I. First, ...") is not an answer: keep looking.
        if (letter := _valid(m.group(1) or m.group(2), n_choices)) is not None:
            return letter
    marked = {_valid(m.group(1), n_choices) for m in _PAREN_LETTER.finditer(text)} - {None}
    if len(marked) == 1:
        return marked.pop()
    if len(marked) > 1:
        return None
    return _match_option_text(text, choices)


def extract_answer_text(text: str) -> str:
    """The final free-form answer: last boxed content, else the text after the last
    "answer is"/"Answer:", else the whole cleaned response."""
    text = clean_prediction(text)
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    phrases = list(_FREEFORM_PHRASE.finditer(text))
    return phrases[-1].group(1) if phrases else text


def _as_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_match(prediction: str, gold: str) -> bool:
    """Normalised exact match, or numeric equality (rel. 1e-6) when both sides are numbers."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if not pred or not ref:
        return False
    if pred == ref:
        return True
    a, b = _as_number(pred), _as_number(ref)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def gold_letter(sample: Sample) -> str:
    """The gold option letter of a multiple-choice sample (answer given as letter or option text)."""
    assert sample.choices, "gold_letter needs a multiple-choice sample"
    answer = sample.answer.strip()
    letter = _letter_from_fragment(answer, len(sample.choices), sample.choices)
    if letter is None:
        raise ValueError(
            f"sample {sample.sample_id!r}: answer {sample.answer!r} is neither an option letter "
            f"nor one of the options {sample.choices}"
        )
    return letter


def score(prediction_text: str, sample: Sample) -> bool:
    """Rule verdict: multiple-choice letter match when `sample.choices`, else boxed/normalised
    exact match against `sample.answer`."""
    if sample.choices:
        n = len(sample.choices)
        return extract_choice(prediction_text, n, sample.choices) == gold_letter(sample)
    return answers_match(extract_answer_text(prediction_text), sample.answer)


__all__ = [
    "answers_match",
    "clean_prediction",
    "extract_answer_text",
    "extract_boxed",
    "extract_choice",
    "gold_letter",
    "normalize_answer",
    "score",
]
