"""Benchmark: batched one-pass latent forward vs the reference's two-pass per-sample loop.

Both run forward + backward of the stage loss (stage 2 with teacher alignment, stage 3 with
latent-trajectory alignment) on the same synthetic batch. The baseline is the faithful reference
(`reference_latent_forward`, mask_mode="reference", detached latent inputs). Reports samples/s,
peak memory (CUDA allocator on GPU; process RSS high-water mark on CPU) and the speed-up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from monet_fast.bench.common import BenchReport, matches, no_match, time_fn
from monet_fast.data import collate, make_samples
from monet_fast.model.arch import arch_of
from monet_fast.model.latent import latent_forward
from monet_fast.model.latent_reference import reference_latent_forward
from monet_fast.model.tiny import tiny_model

# Model sizes: the tiny test model, a mid-size one, and (GPU only) a real-width Qwen2.5-VL-7B
# shaped model with two decoder layers.
MODEL_SIZES: dict[str, dict] = {
    "tiny": {},
    "mid": {
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
    },
    "7b-width-2-layers": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 2,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
    },
}
PROVIDERS = ("batched", "two_pass_reference")


def setup_latent_forward(
    size: str, stage: str, batch_size: int, provider: str, latent_size: int = 8
) -> Callable[[], None]:
    """Build model + batch + teacher and return a callable running one forward+backward."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, processor = tiny_model(seed=0, **MODEL_SIZES[size])
    model = model.to(device, dtype).train()
    for p in arch_of(model).visual(model).parameters():  # frozen in SFT, as in the reference
        p.requires_grad_(False)
    batch = collate(make_samples(batch_size, seed=1), processor, stage, latent_size=latent_size)
    with torch.no_grad():
        states = latent_forward(model, batch, return_states=True)
    teacher = states.obs_states if stage == "stage2" else states.slot_states
    teacher = [t.detach() + 0.1 * torch.randn_like(t) for t in teacher]

    if provider == "batched":

        def step() -> None:
            latent_forward(model, batch, teacher=teacher).loss.backward()

    elif provider == "two_pass_reference":

        def step() -> None:
            reference_latent_forward(model, batch, teacher=teacher).loss.backward()

    else:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")

    def run() -> None:
        model.zero_grad(set_to_none=True)
        step()

    return run


def peak_memory_mib(fn: Callable[[], None]) -> float:
    """Peak memory of one call: CUDA allocator peak, or RSS high-water mark above the start."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    return (peak[0] - base) / 2**20


def run(quick: bool = False, only: str | None = None) -> BenchReport:
    report = BenchReport(name="latent-forward (stage loss forward+backward)")
    sizes = ["tiny"] if quick else ["tiny", "mid"]
    if torch.cuda.is_available() and not quick:
        sizes.append("7b-width-2-layers")
    batches = [1, 8] if quick else [1, 4, 8]
    reps = 2 if quick else 3
    labels = {
        (size, stage, bsz): f"{size} {stage} B={bsz}"
        for size in sizes
        for stage in ("stage2", "stage3")
        for bsz in batches
    }
    selected = [key for key, label in labels.items() if matches(label, only)]
    if not selected:
        return no_match(report, only, list(labels.values()))
    for size, stage, bsz in selected:
        results = {}
        for provider in PROVIDERS:
            fn = setup_latent_forward(size, stage, bsz, provider)
            seconds = time_fn(fn, warmup=1, reps=reps)
            results[provider] = (seconds, peak_memory_mib(fn))
        base_s, base_mem = results["two_pass_reference"]
        for provider, (seconds, mem) in results.items():
            report.add(
                config=labels[(size, stage, bsz)],
                provider=provider,
                seconds=seconds,
                samples_per_s=bsz / seconds,
                peak_mib=mem,
                speedup=base_s / seconds,
            )
    report.notes = (
        "speedup = reference seconds / provider seconds (same batch, same run); the reference is "
        "the two-pass per-sample loop with its own mask/detach semantics."
    )
    return report
