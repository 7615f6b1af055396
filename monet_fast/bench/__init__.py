"""Benchmarks runnable from the CLI (`monet-fast bench NAME`) and from pytest-benchmark.

Each benchmark module exposes `run(quick: bool) -> BenchReport`; the pytest suites under
`benchmarks/` import the same case factories, so both measure the same code. Results are
always ratios against the strongest baseline measured in the same run.
"""

from __future__ import annotations

import importlib

from monet_fast.bench.common import BenchReport, format_report, time_fn, write_json

# name -> "module:function"; a module is imported only when its benchmark runs.
REGISTRY: dict[str, str] = {}


def register(name: str, target: str) -> None:
    REGISTRY[name] = target


register("logprob", "monet_fast.bench.logprob:run")
register("latent-attention", "monet_fast.bench.latent_attention:run")
register("attention", "monet_fast.bench.latent_attention:run")  # the name issue 5 uses
register("latent-forward", "monet_fast.bench.latent_forward:run")
register("latent-decode", "monet_fast.bench.latent_decode:run")
register("train-step", "monet_fast.bench.train_step:run")
register("ce", "monet_fast.bench.chunked_ce:run")
register("serve", "monet_fast.bench.serve:run")


def run_benchmark(name: str, quick: bool = False, only: str | None = None) -> BenchReport:
    """Run benchmark `name`; `only` keeps the cases whose label contains that substring."""
    if name not in REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; available: {sorted(REGISTRY)}")
    module_name, func_name = REGISTRY[name].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return func(quick=quick, only=only)


__all__ = [
    "BenchReport",
    "REGISTRY",
    "format_report",
    "register",
    "run_benchmark",
    "time_fn",
    "write_json",
]
