"""`monet-fast bench ce`: chunked linear + cross-entropy vs the plain full-vocabulary loss.

Qwen2.5-VL-7B's head (vocab 152,064, hidden 3,584), random weights, 1,000 target rows by
default: forward + backward of Σ ce through `head_cross_entropy` with chunk_size 0 (plain: fp32
[N, V] logits, log-softmax kept for backward) and with the chunked op. Reports the time, the
bytes autograd saves for backward (`saved_act_mib`), and the peak memory of the call above its
start (`peak_mib`: the CUDA allocator peak, or the CPU RSS high-water mark sampled every 2 ms).
fp32 on CPU (the weight alone is 2.2 GB), bf16 on a GPU. Not part of `make test`.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from monet_fast.bench.common import BenchReport, matches, no_match
from monet_fast.bench.latent_forward import peak_memory_mib
from monet_fast.bench.train_step import saved_activation_mib
from monet_fast.model.chunked_ce import head_cross_entropy

VOCAB, HIDDEN = 152064, 3584
# (rows, chunk_size, head trains): with a frozen head (LoRA, or to isolate the logits) the peak
# is the logits' alone; with a training head the V x H weight gradient comes on top of both.
CASES = (
    (1000, 0, False),
    (1000, 256, False),
    (1000, 0, True),
    (1000, 256, True),
    (4000, 0, False),
    (4000, 256, False),
)
QUICK_CASES = ((1000, 0, False), (1000, 256, False))


def setup(n_rows: int, chunk_size: int, head: nn.Module):
    device, dtype = head.weight.device, head.weight.dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n_rows, HIDDEN, generator=g).to(device, dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, (n_rows,), generator=g).to(device)

    def step() -> None:
        head.weight.grad = None
        hidden.grad = None
        head_cross_entropy(head, hidden, targets, chunk_size=chunk_size).sum().backward()

    return step


def _measure(step, head: nn.Module, reps: int, cuda: bool) -> tuple[float, float, float]:
    """(median seconds, peak MiB, saved MiB). One call measures all three (a CPU call at full
    vocabulary takes tens of seconds); the saved-tensor hooks cost nothing measurable here."""
    out: dict[str, float] = {}

    def measured() -> None:
        t0 = time.perf_counter()
        out["saved"] = saved_activation_mib(step)
        if cuda:
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t0

    times, peaks = [], []
    for _ in range(reps):
        head.weight.grad = None
        peaks.append(peak_memory_mib(measured))
        times.append(out["seconds"])
    return statistics.median(times), max(peaks), out["saved"]


def run(quick: bool = False, only: str | None = None) -> BenchReport:
    report = BenchReport(name="ce")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    head = nn.Linear(HIDDEN, VOCAB, bias=False).to("cuda" if cuda else "cpu", dtype)
    with torch.no_grad():
        head.weight.normal_(0, 0.02)

    def label(c) -> str:
        return f"{c[0]} rows x {VOCAB} vocab, head {'trains' if c[2] else 'frozen'}"

    cases = [c for c in (QUICK_CASES if quick else CASES) if matches(label(c), only)]
    if not cases:
        return no_match(report, only, [label(c) for c in CASES])
    weight_mib = head.weight.numel() * head.weight.element_size() / 2**20
    plain_s: dict[tuple, float] = {}
    for case in cases:
        n_rows, chunk, head_grad = case
        head.weight.requires_grad_(head_grad)
        step = setup(n_rows, chunk, head)
        seconds, peak, saved = _measure(step, head, reps=1 if quick else 3, cuda=cuda)
        row = dict(
            config=f"{label(case)}, {str(dtype).removeprefix('torch.')}",
            provider="plain" if chunk == 0 else f"chunked {chunk}",
            seconds=seconds,
            peak_mib=peak,
            saved_act_mib=saved - weight_mib,  # the weight is saved by both; not activation
        )
        key = (n_rows, head_grad)
        if chunk == 0:
            plain_s[key] = seconds
        elif key in plain_s:
            row["speedup"] = plain_s[key] / seconds
        report.add(**row)
        head.weight.grad = None
    report.notes = (
        f"peak_mib: above the start; with a training head it includes the weight gradient "
        f"({weight_mib:.0f} MiB, the same for both). saved_act_mib: distinct storages saved "
        "for backward, the weight excluded."
    )
    return report
