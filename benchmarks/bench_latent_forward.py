"""pytest-benchmark suite: batched latent forward vs the two-pass reference (see
monet_fast/bench/latent_forward.py, which `monet-fast bench latent-forward` runs)."""

import pytest

from monet_fast.bench.latent_forward import PROVIDERS, setup_latent_forward


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stage", ["stage2", "stage3"])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_latent_forward(benchmark, provider, stage, batch_size):
    fn = setup_latent_forward("tiny", stage, batch_size, provider)
    benchmark.group = f"latent-forward {stage} B={batch_size}"
    benchmark.pedantic(fn, warmup_rounds=1, rounds=3)
