"""`monet-fast bench logprob`: fused Gaussian log-prob / latent policy loss vs eager vs compile.

Compares, on VLPO-sized latents (4k-64k rows x 3584, bf16, the Qwen2.5-VL-7B hidden size):

* `monet_fast`: the Triton kernels of `monet_fast.kernels.gaussian_logprob`;
* `eager`: the plain-torch reference in the same module (fp32 arithmetic, as the kernels do);
* `eager_bf16`: Monet's own arithmetic (subtraction, square and sum in the input dtype), for
  information: it is what the reference trainer runs, and it is less precise;
* `compile`: `torch.compile` of the fp32 reference (the strongest generic baseline).

Modes: `fwd` (inputs without grad) and `fwd_bwd` (forward + gradient w.r.t. mu only, as in
VLPO: z is the recorded rollout latent). GB/s counts the minimum HBM traffic of the fused
algorithm, the same byte count for every provider (an effective bandwidth): forward reads z
and mu once, backward reads them again and writes dmu, plus the per-step fp32 vectors.
`pct_hbm` relates it to the GPU's peak HBM bandwidth when the device is recognised.

The pytest-benchmark suite `benchmarks/bench_gaussian_logprob.py` uses the same factories
(`CASES`, `setup_case`, `bytes_moved`), so both measure the same thing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from monet_fast.bench.common import BenchReport, matches, no_match

HIDDEN = 3584  # Qwen2.5-VL-7B hidden size: the width of one latent
ROWS = (4096, 16384, 65536)
QUICK_ROWS = (16384,)  # the size of the target
OPS = ("logprob", "policy_loss")
MODES = ("fwd", "fwd_bwd")
PROVIDERS = ("monet_fast", "eager", "eager_bf16", "compile")

# Peak HBM bandwidth (bytes/s) by device-name substring, most specific first.
_HBM_PEAK = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5, HBM3 ("NVIDIA H100 80GB HBM3")
)


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    op: str  # "logprob" | "policy_loss"
    n_rows: int
    mode: str  # "fwd" | "fwd_bwd"
    dim: int = HIDDEN
    dtype: torch.dtype = torch.bfloat16

    @property
    def label(self) -> str:
        return f"{self.op} {self.n_rows}x{self.dim} {str(self.dtype).removeprefix('torch.')}"


def cases(quick: bool) -> list[Case]:
    ops = ("logprob",) if quick else OPS
    rows = QUICK_ROWS if quick else ROWS
    return [Case(op, n, mode) for op in ops for n in rows for mode in MODES]


CASES = cases(quick=False)


def hbm_peak_bytes_per_s(name: str) -> float | None:
    """Peak HBM bandwidth of a GPU from its name, or None when unknown."""
    for key, peak in _HBM_PEAK:
        if key in name:
            return peak
    return None


def bytes_moved(case: Case) -> int:
    """Minimum HBM traffic of the fused algorithm for `case` (bytes)."""
    width = case.n_rows * case.dim * torch.finfo(case.dtype).bits // 8  # one [N, D] tensor
    # Per-step fp32 vectors: logprob writes logp (and reads its grad backward); the policy loss
    # reads old_logp, advantages, mask and writes loss, logp, ratio, dloss/dlogp (+2 int8 flags).
    per_row_fwd = 4 if case.op == "logprob" else 3 * 4 + 4 * 4 + 2
    per_row_bwd = 4 if case.op == "logprob" else 2 * 4
    total = 2 * width + case.n_rows * per_row_fwd
    if case.mode == "fwd_bwd":
        total += 3 * width + case.n_rows * per_row_bwd  # read z, mu; write dmu
    return total


def make_inputs(case: Case, device: str | torch.device = "cuda", seed: int = 0) -> dict:
    """Random VLPO-like inputs: mu ~ N(0,1), z = mu + noise, old_logp near logp."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (case.n_rows, case.dim)
    mu = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    z = mu + 0.5 * torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    inputs = {"mu": mu.to(case.dtype), "z": z.to(case.dtype)}
    if case.op == "policy_loss":
        n = case.n_rows
        inputs["old_logp"] = -0.125 * case.dim / 100 + 0.3 * torch.randn(
            n, generator=gen, device=device
        )
        inputs["advantages"] = torch.randn(n, generator=gen, device=device)
        inputs["mask"] = torch.rand(n, generator=gen, device=device) > 0.1
    return inputs


def _functions(op: str) -> tuple[Callable, Callable]:
    """(fused, reference) for an op; imported lazily so the CLI works without Triton."""
    # import_module: `monet_fast.kernels.gaussian_logprob` as an attribute is the re-exported
    # function, which shadows the module of the same name.
    glp = importlib.import_module("monet_fast.kernels.gaussian_logprob")

    if op == "logprob":
        return glp.gaussian_logprob, glp.gaussian_logprob_reference
    return glp.latent_policy_loss, glp.latent_policy_loss_reference


def _monet_logprob(z: torch.Tensor, mu: torch.Tensor, sigma: float = 10.0) -> torch.Tensor:
    """Monet's `compute_latent_log_probs`: computed in the model dtype, then cast to fp32."""
    return (-0.5 * ((z - mu) ** 2).sum(-1) / sigma**2).float()


def _monet_policy_loss(mu, z, old_logp, advantages, mask, sigma: float = 10.0) -> torch.Tensor:
    glp = importlib.import_module("monet_fast.kernels.gaussian_logprob")
    logp = _monet_logprob(z, mu, sigma)
    return glp.policy_loss_from_logp_reference(logp, old_logp, advantages, mask).loss


_COMPILED: dict[str, Callable] = {}


def setup_case(
    case: Case, provider: str, device: str | torch.device = "cuda"
) -> Callable[[], object]:
    """A zero-argument callable running `case` with `provider` (inputs allocated once)."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    fused, reference = _functions(case.op)
    if provider == "monet_fast":
        fn = fused
    elif provider == "eager":
        fn = reference
    elif provider == "eager_bf16":
        fn = _monet_logprob if case.op == "logprob" else _monet_policy_loss
    else:
        key = case.op
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(reference, dynamic=False)
        fn = _COMPILED[key]
    inputs = make_inputs(case, device)
    if case.op == "logprob":
        args = (inputs["z"], inputs["mu"])
    else:
        args = tuple(inputs[k] for k in ("mu", "z", "old_logp", "advantages", "mask"))

    if case.mode == "fwd":

        def run_fwd() -> object:
            with torch.no_grad():
                return fn(*args)

        return run_fwd

    mu = inputs["mu"].requires_grad_(True)
    grad_out = torch.ones(case.n_rows, device=device, dtype=torch.float32)

    def run_fwd_bwd() -> object:
        # autograd.grad, not .backward(): accumulating into mu.grad would add a full-width
        # read-modify-write that is not part of the op.
        return torch.autograd.grad(fn(*args), mu, grad_out)

    return run_fwd_bwd


def _time_cuda(fn: Callable[[], object], quick: bool) -> float:
    """Median seconds per call from CUDA events, L2 flushed between calls (triton do_bench)."""
    from monet_fast._optional import require

    do_bench = require("triton.testing", "GPU timing").do_bench
    return (
        do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 200, return_mode="median")
        / 1e3
    )


def run(quick: bool = False, only: str | None = None) -> BenchReport:
    """Benchmark every case on the GPU; on CPU return a report that says why it was skipped."""
    report = BenchReport(name="logprob")
    if not torch.cuda.is_available():
        report.skipped = (
            "needs a CUDA GPU: the metric is HBM bandwidth, which the Triton CPU interpreter "
            "cannot measure (no CUDA device found)"
        )
        return report
    device_name = torch.cuda.get_device_name(0)
    peak = hbm_peak_bytes_per_s(device_name)
    selected = [c for c in cases(quick) if matches(c.label, only)]
    if not selected:
        return no_match(report, only, [c.label for c in cases(quick)])
    for case in selected:
        times: dict[str, float] = {}
        for provider in PROVIDERS:
            try:
                times[provider] = _time_cuda(setup_case(case, provider), quick)
            except Exception as err:  # noqa: BLE001 - e.g. torch.compile unavailable: report it
                report.notes += f"\n{case.label} {case.mode} {provider}: failed ({err!r:.200})"
            torch.cuda.empty_cache()
        nbytes = bytes_moved(case)
        for provider, seconds in times.items():
            row = {
                "config": case.label,
                "mode": case.mode,
                "provider": provider,
                "seconds": seconds,
                "GB/s": nbytes / seconds / 1e9,
            }
            if peak is not None:
                row["pct_hbm"] = 100.0 * nbytes / seconds / peak
            if "eager" in times:
                row["speedup_vs_eager"] = times["eager"] / seconds
            if "compile" in times:
                row["speedup_vs_compile"] = times["compile"] / seconds
            report.add(**row)
    peak_note = (
        f"peak HBM {peak / 1e12:.2f} TB/s ({device_name})"
        if peak is not None
        else f"peak HBM of {device_name!r} unknown: pct_hbm omitted"
    )
    report.notes = (
        "GB/s = minimum traffic of the fused algorithm / time (same bytes for every provider); "
        f"{peak_note}; fwd_bwd = forward + grad w.r.t. mu (z is a constant rollout latent). "
        "Target: monet_fast fwd_bwd >= 80 % HBM and >= 3x eager at 16384x3584." + report.notes
    )
    return report
