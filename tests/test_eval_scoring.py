"""Rule-based scoring: boxed extraction, multiple-choice letters, normalisation, per-category
accuracy, and the optional OpenAI-compatible judge against a local stub server (no network)."""

from __future__ import annotations

import pytest
from judge_stub import StubJudge

from monet_fast.data.types import Sample, Segment
from monet_fast.decode import collapse_latent_spans
from monet_fast.eval.scoring import accuracy_by_category
from monet_fast.tasks.answers import (
    answers_match,
    clean_prediction,
    extract_answer_text,
    extract_boxed,
    extract_choice,
    normalize_answer,
    score,
)
from monet_fast.tasks.judge import JudgeError, OpenAIJudge
from monet_fast.tasks.scoring import ScoredItem, score_item, score_predictions

CHOICES = ["red", "blue", "green", "yellow"]


def mc_sample(answer="B", choices=CHOICES, category="color", sample_id="q0") -> Sample:
    return Sample(
        question=[Segment("text", "What colour is the cup?")],
        reasoning=[],
        answer=answer,
        sample_id=sample_id,
        choices=list(choices),
        category=category,
    )


def free_sample(answer: str, sample_id="f0") -> Sample:
    return Sample(
        question=[Segment("text", "Q?")], reasoning=[], answer=answer, sample_id=sample_id
    )


# ---- extract_boxed ---------------------------------------------------------------------------

BOXED_CASES = [
    ("so \\boxed{B}.", "B"),
    ("\\boxed{ \\frac{1}{2} }", "\\frac{1}{2}"),  # nested braces, stripped
    ("\\boxed{A} then \\boxed{C}", "C"),  # last one wins
    ("\\boxed{A} then \\boxed{C", "A"),  # truncated last box is skipped
    ("\\boxed {D}", "D"),  # space before the brace
    ("\\boxed{\\boxed{B}}", "\\boxed{B}"),  # outer content
    ("no box here", None),
    ("\\boxed{", None),
    ("\\boxed{}", ""),
]


@pytest.mark.parametrize("text, expected", BOXED_CASES)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# ---- extract_choice --------------------------------------------------------------------------

CHOICE_CASES = [
    ("\\boxed{B}", "B"),
    ("B.", "B"),
    ("(B)", "B"),
    ("B", "B"),
    ("b", "B"),
    ("Answer: B", "B"),
    ("the answer is b", "B"),
    ("The answer is (D).", "D"),
    ("**Answer:** D", "D"),
    ("The best answer is: C", "C"),
    ("Option C is correct.", "C"),
    ("(C) green, because the cup looks green", "C"),
    ("B. blue", "B"),
    ("\\boxed{\\text{C}}", "C"),
    ("\\boxed{(b)}", "B"),
    ("\\boxed{B. blue}", "B"),
    ("\\boxed{blue}", "B"),  # option text inside the box
    ("The cup is blue.", "B"),  # option text match
    ("It is light blue.", "B"),
    ("Looking at the options: the cup is blue", "B"),  # "options" is not "option s"
    ("I. First, look closely. The cup is blue.", "B"),  # roman numeral, not an option letter
    ("The answer is not A. The answer is C.", "C"),  # the last explicit phrase wins
    ("To answer a question like this we look closely. Final answer: A", "A"),
    # latent block content is meaningless decoded ids: never read
    ("<abs_vis_token>(A)(D)</abs_vis_token> Answer: C<|im_end|>", "C"),
    # ambiguous or absent -> None
    ("It's red, not blue", None),
    ("I think (A) or (C)", None),
    ("\\boxed{purple}", None),  # a boxed answer matching nothing is not rescued elsewhere
    ("\\boxed{Z}", None),
    ("Answer: E", None),  # out of range for 4 options
    ("the answer is a cat", None),  # lower-case article, not option A
    ("A cat sat there", None),
    ("", None),
    ("So the answer is \\boxed{B", None),  # truncated: no committed answer
]


@pytest.mark.parametrize("text, expected", CHOICE_CASES)
def test_extract_choice(text, expected):
    assert extract_choice(text, 4, CHOICES) == expected


def test_extract_choice_without_option_texts_and_bounds():
    assert extract_choice("The cup is blue.", 4) is None  # no option texts to match
    assert extract_choice("Answer: E", 5) == "E"
    with pytest.raises(ValueError, match="n_choices"):
        extract_choice("A", 0)
    with pytest.raises(ValueError, match="choices"):
        extract_choice("A", 3, CHOICES)


# ---- normalisation and free-form answers -----------------------------------------------------

NORMALIZE_CASES = [
    ("The \\text{Red} car.", "red car"),
    ("\\boxed{\\textbf{STOP}}", "stop"),
    ("  An apple, the PIE! ", "apple pie"),
    ("1,000.50", "1000.50"),
    ("-3", "-3"),
    ("$x^2$", "x 2"),
    ("well-known", "well known"),
    ("", ""),
]


@pytest.mark.parametrize("text, expected", NORMALIZE_CASES)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_answers_match_and_free_form_score():
    assert answers_match("3.50", "3.5")  # numeric equality
    assert answers_match("\\boxed{3}", "3")
    assert not answers_match("", "")  # an empty answer is never right
    assert not answers_match("4", "3")
    assert extract_answer_text("reasoning...\nso the answer is 42\n") == "42"
    assert extract_answer_text("blah \\boxed{The STOP sign}") == "The STOP sign"
    assert score("It says \\boxed{\\text{Stop}}.", free_sample("STOP"))
    assert score("The answer is: 1,024", free_sample("1024"))
    assert not score("\\boxed{go}", free_sample("STOP"))


def test_latent_content_is_emptied_before_scoring():
    # REFERENCE.md oracle 20.
    assert (
        collapse_latent_spans("a<abs_vis_token>xyz</abs_vis_token>b")
        == "a<abs_vis_token><latent></abs_vis_token>b"
    )
    text = "<abs_vis_token>x\ny</abs_vis_token> mid <abs_vis_token></abs_vis_token>"
    assert collapse_latent_spans(text) == (
        "<abs_vis_token><latent></abs_vis_token> mid <abs_vis_token><latent></abs_vis_token>"
    )
    # a letter inside a latent block is not read as the answer
    assert clean_prediction("<abs_vis_token>B</abs_vis_token> \\boxed{A}").endswith("\\boxed{A}")
    assert "B" not in clean_prediction("<abs_vis_token>B</abs_vis_token>")


def test_score_multiple_choice_gold_as_letter_or_text():
    assert score("\\boxed{B}", mc_sample("B"))
    assert score("\\boxed{B}", mc_sample("blue"))  # gold given as option text
    assert not score("\\boxed{A}", mc_sample("B"))
    with pytest.raises(ValueError, match="neither an option letter"):
        score("\\boxed{A}", mc_sample("purple"))


def test_accuracy_by_category():
    records = [
        ScoredItem("a", True, "x"),
        ScoredItem("b", False, "x"),
        {"sample_id": "c", "correct": True, "category": "y"},
        {"sample_id": "d", "correct": True, "category": None},
    ]
    acc = accuracy_by_category(records)
    assert acc["overall"] == {"n": 4, "correct": 3, "accuracy": 0.75}
    assert acc["by_category"]["x"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert acc["by_category"]["y"]["accuracy"] == 1.0
    assert acc["by_category"]["uncategorized"]["n"] == 1
    assert list(acc["by_category"]) == sorted(acc["by_category"])
    empty = accuracy_by_category([])
    assert (
        empty["overall"]["n"] == 0 and empty["overall"]["accuracy"] != empty["overall"]["accuracy"]
    )


# ---- the judge, against a stub OpenAI-compatible server --------------------------------------


# The scripted local judge server shared with the judge-client tests.
_Stub = StubJudge


def test_judge_yes_no_and_request_shape(monkeypatch):
    monkeypatch.setenv("MONET_TEST_JUDGE_KEY", "sk-test")
    with _Stub([("reply", "Yes."), ("reply", "no")]) as stub:
        judge = OpenAIJudge(stub.url + "/", "judge-model", api_key_env="MONET_TEST_JUDGE_KEY")
        assert judge("Q?", "it is blue", "B. blue") is True
        assert judge("Q?", "it is red", "B. blue") is False
    first = stub.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "judge-model"
    assert "B. blue" in first["body"]["messages"][0]["content"]
    assert "sk-test" not in repr(judge)


def test_judge_retries_after_timeout_and_server_error():
    script = [("sleep", 0.6, "no"), ("status", 503), ("reply", "yes")]
    with _Stub(script) as stub:
        judge = OpenAIJudge(stub.url, "m", api_key_env=None, timeout=0.2, retries=2, backoff=0.0)
        assert judge("Q?", "p", "g") is True
        assert judge.n_requests == 3
    assert stub.requests[0]["auth"] is None


def test_judge_gives_up_and_does_not_retry_client_errors():
    with _Stub([("status", 500)] * 3) as stub:
        judge = OpenAIJudge(stub.url, "m", api_key_env=None, timeout=2.0, retries=1, backoff=0.0)
        with pytest.raises(JudgeError, match="gave up after 2 attempts"):
            judge("Q?", "p", "g")
        assert len(stub.requests) == 2
    with _Stub([("status", 401), ("reply", "yes")]) as stub:
        judge = OpenAIJudge(stub.url, "m", api_key_env=None, retries=3, backoff=0.0)
        with pytest.raises(JudgeError, match="HTTP 401"):
            judge("Q?", "p", "g")
        assert len(stub.requests) == 1
    with _Stub([("reply", "maybe")]) as stub:
        with pytest.raises(JudgeError, match="neither yes nor no"):
            OpenAIJudge(stub.url, "m", api_key_env=None)("Q?", "p", "g")
    with pytest.raises(ValueError, match="http"):
        OpenAIJudge("localhost:8000", "m")


def test_judge_only_asked_when_rules_say_wrong():
    samples = [mc_sample("B", sample_id="right"), mc_sample("B", sample_id="wrong")]
    with _Stub([("reply", "yes")]) as stub:
        judge = OpenAIJudge(stub.url, "m", api_key_env=None)
        items = score_predictions(["\\boxed{B}", "I'd say the sky-coloured one"], samples, judge)
    assert len(stub.requests) == 1  # only the rule-wrong item went to the judge
    assert "B. blue" in stub.requests[0]["body"]["messages"][0]["content"]
    right, judged = items
    assert right.correct and right.judge is None
    assert judged.correct and not judged.rule_correct and judged.judge == "correct"


def test_judge_failure_keeps_rule_verdict():
    with _Stub([("status", 500)] * 2) as stub:
        judge = OpenAIJudge(stub.url, "m", api_key_env=None, retries=1, backoff=0.0)
        item = score_item("no idea", mc_sample("B"), judge)
    assert not item.correct and item.judge == "error"
    # Judge off by default: nothing is asked.
    assert score_item("no idea", mc_sample("B")).judge is None
