"""pytest-benchmark suite: fused Gaussian log-prob / latent policy loss vs eager vs torch.compile.

Same cases, inputs and byte counts as `monet-fast bench logprob` (`monet_fast.bench.logprob`);
this suite adds pytest-benchmark's statistics and comparison tooling. GPU only: the metric is
HBM bandwidth. Run: `pytest benchmarks/bench_gaussian_logprob.py` (add `--benchmark-json P`).
"""

from __future__ import annotations

import pytest
import torch

from monet_fast.bench.logprob import CASES, PROVIDERS, bytes_moved, hbm_peak_bytes_per_s, setup_case

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the benchmark measures HBM bandwidth, which the Triton CPU "
    "interpreter cannot (no CUDA device found)",
)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.label.replace(' ', '-')}-{c.mode}")
def test_gaussian_logprob(benchmark, case, provider):
    fn = setup_case(case, provider)

    def timed() -> None:
        fn()
        torch.cuda.synchronize()

    benchmark.group = f"{case.label} {case.mode}"
    benchmark.pedantic(timed, warmup_rounds=5, rounds=50, iterations=1)
    seconds = benchmark.stats.stats.median
    nbytes = bytes_moved(case)
    benchmark.extra_info["GB/s"] = nbytes / seconds / 1e9
    peak = hbm_peak_bytes_per_s(torch.cuda.get_device_name(0))
    if peak is not None:
        benchmark.extra_info["pct_hbm"] = 100.0 * nbytes / seconds / peak
    torch.cuda.empty_cache()
