"""monet_fast.eval: benchmark readers, scoring, latent interventions, collapse metrics, reports.

Decode-independent by design: `read_benchmark` gives `Sample`s, the decoder (not here) turns
them into response texts and latent traces, applying a `LatentIntervention`; `score_predictions`,
`build_report` and `write_report` turn those into report.json / report.md / PNG plots.
"""

from monet_fast.eval.collapse import (
    collapse_metrics,
    cosine_matrix,
    effective_rank,
    trace_matrix,
)
from monet_fast.eval.interventions import (
    DECODER_INTERVENTIONS,
    INTERVENTIONS,
    VECTOR_INTERVENTIONS,
    LatentIntervention,
    apply_to_traces,
    parse_interventions,
)
from monet_fast.eval.readers import BENCHMARKS, EncodedImageSegment, read_benchmark
from monet_fast.eval.report import build_report, render_markdown, write_report
from monet_fast.eval.scoring import accuracy_by_category
from monet_fast.eval.stats import bootstrap_ci, paired_bootstrap_delta

# Answer parsing, scoring, prompts and the judge live in monet_fast.tasks (below train/ and eval/);
# re-exported here because they are part of what evaluation offers.
from monet_fast.tasks import (
    MONET_EVAL_SYSTEM,
    JudgeError,
    OpenAIJudge,
    ScoredItem,
    answers_match,
    clean_prediction,
    extract_answer_text,
    extract_boxed,
    extract_choice,
    format_mc_question,
    normalize_answer,
    score,
    score_item,
    score_predictions,
)

__all__ = [
    "BENCHMARKS",
    "DECODER_INTERVENTIONS",
    "INTERVENTIONS",
    "MONET_EVAL_SYSTEM",
    "VECTOR_INTERVENTIONS",
    "EncodedImageSegment",
    "JudgeError",
    "LatentIntervention",
    "OpenAIJudge",
    "ScoredItem",
    "accuracy_by_category",
    "answers_match",
    "apply_to_traces",
    "bootstrap_ci",
    "build_report",
    "clean_prediction",
    "collapse_metrics",
    "cosine_matrix",
    "effective_rank",
    "extract_answer_text",
    "extract_boxed",
    "extract_choice",
    "format_mc_question",
    "normalize_answer",
    "paired_bootstrap_delta",
    "parse_interventions",
    "read_benchmark",
    "render_markdown",
    "score",
    "score_item",
    "score_predictions",
    "trace_matrix",
    "write_report",
]
