"""pytest-benchmark suite: one stage-2 SFT step on DeepSpeed, ours vs the two-pass reference.

Same cases and set-up as `monet-fast bench train-step` (`monet_fast.bench.train_step`): the
engine, optimizer and objective are the SFT recipe's; only the latent forward differs.
Run: `pytest benchmarks/bench_train_step.py` (add `--benchmark-json P`).
"""

from __future__ import annotations

import pytest

from monet_fast.bench.train_step import PROVIDERS, cases, setup_case


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", cases(quick=True), ids=lambda c: c.label.replace(" ", "-"))
def test_train_step(benchmark, case, provider):
    step = setup_case(case, provider)
    benchmark.group = f"train-step {case.label}"
    benchmark.pedantic(step, warmup_rounds=1, rounds=3, iterations=1)
    benchmark.extra_info["samples_per_s"] = case.batch_size / benchmark.stats.stats.median
