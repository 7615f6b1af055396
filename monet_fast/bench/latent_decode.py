"""`monet-fast bench latent-decode`: decoding tokens/s of the latent engine vs its baselines.

Providers (same model, same prompts, same batch, greedy, every row decodes exactly
`max_new_tokens` tokens):

* `engine`: `monet_fast.decode.generate` — C++/CUDA state machine, static KV cache, CUDA graphs
  on GPU (on CPU there are no graphs: it is the eager engine).
* `engine-eager`: the same without CUDA graphs (GPU only; on CPU it would repeat `engine`).
* `python-loop`: `monet_fast.decode.pyloop` — the reference runner's way: transformers'
  DynamicCache, a host sync and a Python state update per request every step.
* `engine-plain`: the engine on the same prompts without forced latent blocks — plain decoding
  (with CUDA graphs on GPU), the reference point of the issue's GPU target: latent decoding
  >= 95 % of its tokens/s (`ratio_vs_plain` row).
* `engine-text` / `hf-generate-text`: plain decoding of text-only prompts by our engine and by
  transformers' `generate` — the plain-decoding baseline outside our code.

Latent workload: question prompts with an image; a graph-safe logits processor forces
`<abs_vis_token>` every `LATENT_PERIOD` output tokens, so with K = 8 (the tiny model's saved
latent_size, sft layout) about half of all decode steps are latent steps. Outputs of `engine` and
`python-loop` are compared token for token (`same_as_loop` column); `engine-text` is compared
with `hf-generate-text` (`same_as_hf`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from monet_fast.bench.common import BenchReport, matches, no_match, time_fn

BATCHES = (1, 8, 32)
PROVIDERS = (
    "engine",
    "engine-eager",
    "python-loop",
    "engine-plain",
    "engine-text",
    "hf-generate-text",
)
LATENT_PERIOD = 16
MODEL_SEED = 0
# Larger-than-default init so the random tiny model's greedy text is not one repeated token.
INIT_RANGE = 0.2


@dataclass(frozen=True)
class Case:
    batch: int
    max_new_tokens: int

    @property
    def label(self) -> str:
        return f"B={self.batch} new={self.max_new_tokens}"


def cases(quick: bool) -> list[Case]:
    return [Case(b, 32 if quick else 128) for b in BATCHES]


def force_latent_every(start_id: int, period: int) -> Callable:
    """Logits processor opening a latent block at output index 1, 1+period, ... (graph-safe)."""

    def processor(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        bonus = (torch.remainder(index, period) == 1).to(logits.dtype) * 1e4
        logits[:, start_id] += bonus
        return logits

    return processor


def build_model(device: torch.device | None = None):
    """(model, processor) for the benchmark: the tiny model on `device` (GPU: bf16)."""
    from monet_fast.model.tiny import tiny_model

    model, processor = tiny_model(seed=MODEL_SEED, initializer_range=INIT_RANGE)
    if device is not None and device.type == "cuda":
        model = model.to(device=device, dtype=torch.bfloat16)
    return model, processor


def latent_inputs(batch: int) -> list[dict]:
    from monet_fast.data.synthetic import make_samples
    from monet_fast.model.sequence import render_prompt

    samples = make_samples(batch, seed=1)
    return [{"text": render_prompt(s), "images": list(s.question_images)} for s in samples]


def text_inputs(processor, batch: int) -> list[str]:
    from monet_fast.data.synthetic import make_samples
    from monet_fast.model.tokens import IMAGE_PAD, VISION_END, VISION_START

    out = []
    for sample in make_samples(batch, seed=1):
        question = "".join(seg.text for seg in sample.question if seg.kind == "text")
        for tok in (VISION_START, IMAGE_PAD, VISION_END):
            question = question.replace(tok, "")
        messages = [{"role": "user", "content": question.strip() or "Describe the image."}]
        out.append(
            processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    return out


def setup_case(model, processor, case: Case, provider: str) -> Callable[[], list[torch.Tensor]]:
    """A callable running one decode of `case` with `provider`; returns the generated ids."""
    from monet_fast.decode import generate
    from monet_fast.decode.pyloop import generate_python_loop
    from monet_fast.model.config import get_latent_config

    start_id = get_latent_config(model).latent_start_id
    # An id the sampler can never produce: every row decodes exactly max_new_tokens tokens.
    never = model.get_input_embeddings().weight.shape[0]
    common = dict(max_new_tokens=case.max_new_tokens, eos_token_id=[never])
    latent = dict(common, logits_processor=force_latent_every(start_id, LATENT_PERIOD))
    if provider in ("engine", "engine-eager"):
        inputs = latent_inputs(case.batch)
        graphs = provider == "engine"
        return lambda: (
            generate(model, processor, inputs, use_cuda_graphs=graphs, **latent).sequences
        )
    if provider == "engine-plain":
        inputs = latent_inputs(case.batch)
        return lambda: generate(model, processor, inputs, **common).sequences
    if provider == "python-loop":
        inputs = latent_inputs(case.batch)
        return lambda: generate_python_loop(model, processor, inputs, **latent).sequences
    if provider == "engine-text":
        # Plain decoding: START is suppressed (max_latent_blocks=0 masks it), as HF's
        # suppress_tokens does below, so the two must agree token for token.
        inputs = text_inputs(processor, case.batch)
        return lambda: generate(model, processor, inputs, max_latent_blocks=0, **common).sequences
    if provider == "hf-generate-text":
        texts = text_inputs(processor, case.batch)
        tok = processor.tokenizer
        old = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = processor(text=texts, return_tensors="pt", padding=True).to(model.device)
        finally:
            tok.padding_side = old
        prompt_len = enc["input_ids"].shape[1]

        def run() -> list[torch.Tensor]:
            with torch.inference_mode():
                ids = model.generate(
                    **enc,
                    do_sample=False,
                    max_new_tokens=case.max_new_tokens,
                    min_new_tokens=case.max_new_tokens,
                    suppress_tokens=[start_id],
                )
            return [row[prompt_len:].cpu() for row in ids]

        return run
    raise ValueError(f"unknown provider {provider!r}; one of {PROVIDERS}")


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


def run(quick: bool = False, only: str | None = None) -> BenchReport:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = build_model(device)
    report = BenchReport(name="latent-decode")
    reps = 5 if quick else 7
    providers = [p for p in PROVIDERS if device.type == "cuda" or p != "engine-eager"]
    selected = [c for c in cases(quick) if matches(c.label, only)]
    if not selected:
        return no_match(report, only, [c.label for c in cases(quick)])
    for case in selected:
        fns = {p: setup_case(model, processor, case, p) for p in providers}
        outputs = {p: fn() for p, fn in fns.items()}  # also the warm-up (graph capture on GPU)
        # Interleave the providers, one timed run each per round, so that load changes on a
        # shared machine hit all of them alike; report the best round (the least disturbed by
        # other processes: on a busy 2-core machine the median still swings by 2x).
        times: dict[str, list[float]] = {p: [] for p in providers}
        for _ in range(reps):
            for p, fn in fns.items():
                times[p].append(time_fn(fn, warmup=0, reps=1))
        results = {p: (min(times[p]), outputs[p]) for p in providers}
        loop_s = results["python-loop"][0]
        plain_tps = None
        for provider in providers:
            seconds, outputs = results[provider]
            n_tokens = sum(len(o) for o in outputs)
            row = dict(
                config=case.label,
                provider=provider,
                seconds=seconds,
                tokens=n_tokens,
                tokens_per_s=n_tokens / seconds,
            )
            if provider in ("engine", "engine-eager", "python-loop"):
                row["vs_python_loop"] = loop_s / seconds
                row["same_as_loop"] = _same(outputs, results["python-loop"][1])
            if provider == "engine-text":
                row["same_as_hf"] = _same(outputs, results["hf-generate-text"][1])
            if provider == "engine-plain":
                plain_tps = n_tokens / seconds
            report.add(**row)
        if plain_tps is not None:
            seconds, outputs = results["engine"]
            latent_tps = sum(len(o) for o in outputs) / seconds
            report.add(
                config=case.label,
                provider="engine / engine-plain",
                tokens_per_s=latent_tps,
                ratio_vs_plain=latent_tps / plain_tps,
            )
    threads = torch.get_num_threads()
    report.notes = (
        f"Tiny Qwen2.5-VL (seed {MODEL_SEED}, init range {INIT_RANGE}), greedy, sft layout, "
        f"K=8, a latent block forced every {LATENT_PERIOD} output tokens (about half of all "
        f"steps are latent). {'CUDA graphs on for `engine`.' if device.type == 'cuda' else ''}"
        f" torch threads: {threads}. seconds: best of {reps} interleaved rounds. "
        "`vs_python_loop` = python-loop seconds / provider seconds; "
        "the last row per batch relates latent decoding to plain decoding (same engine, same "
        "prompts; GPU target >= 0.95 with graphs)."
    )
    return report
