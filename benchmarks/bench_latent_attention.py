"""pytest-benchmark suite: latent-mask attention vs FlexAttention vs SDPA with the dense mask.

Same cases, inputs and FLOP counts as `monet-fast bench latent-attention`
(`monet_fast.bench.latent_attention`); this suite adds pytest-benchmark's statistics and
comparison tooling. GPU only. Run: `pytest benchmarks/bench_latent_attention.py`
(add `--benchmark-json P`).
"""

from __future__ import annotations

import pytest
import torch

from monet_fast.bench.latent_attention import (
    CASES,
    PROVIDERS,
    attention_flops,
    make_inputs,
    setup_case,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: FlexAttention's backward is not supported on CPU and the Triton "
    "kernel runs there only in the interpreter (no CUDA device found)",
)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.label.replace(' ', '-')}-{c.mode}")
def test_latent_attention(benchmark, case, provider):
    inputs = make_inputs(case)
    fn = setup_case(case, provider, inputs=inputs)

    def timed() -> None:
        fn()
        torch.cuda.synchronize()

    benchmark.group = f"{case.label} {case.mode}"
    benchmark.pedantic(timed, warmup_rounds=3, rounds=20, iterations=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["TFLOP/s"] = attention_flops(case, inputs["masked_rows"]) / seconds / 1e12
    torch.cuda.empty_cache()
