"""pytest-benchmark suite: latent decoding tokens/s — engine vs no-graphs vs Python loop vs HF.

Same cases, model, prompts and providers as `monet-fast bench latent-decode`
(`monet_fast.bench.latent_decode`); this suite adds pytest-benchmark's statistics and
comparison tooling. Runs on CPU (tiny model) and GPU (CUDA graphs for `engine`).
Run: `pytest benchmarks/bench_latent_decode.py` (add `--benchmark-json P`).
"""

from __future__ import annotations

import functools

import pytest
import torch

from monet_fast.bench.latent_decode import PROVIDERS, build_model, cases, setup_case


@functools.lru_cache(maxsize=1)
def _model():
    return build_model(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", cases(quick=True), ids=lambda c: c.label.replace(" ", "-"))
def test_latent_decode(benchmark, case, provider):
    if provider == "engine-eager" and not torch.cuda.is_available():
        pytest.skip("without CUDA, engine-eager is the same run as engine")
    model, processor = _model()
    fn = setup_case(model, processor, case, provider)
    outputs = fn()  # warm-up (captures the CUDA graph on GPU)

    def timed() -> None:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    benchmark.group = case.label
    benchmark.pedantic(timed, warmup_rounds=0, rounds=3, iterations=1)
    n_tokens = sum(len(o) for o in outputs)
    benchmark.extra_info["tokens_per_s"] = n_tokens / benchmark.stats.stats.median
