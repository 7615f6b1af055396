"""`monet-fast bench train-step`: one stage-2 SFT optimizer step on DeepSpeed, ours vs reference.

Both providers run the same training step through the same DeepSpeed engine set-up (ZeRO-2,
torch AdamW, gradient clipping 1.0; fp32 on CPU, bf16 on GPU) and the same `LatentTrainModule`
objective the SFT recipes use; only the latent forward differs:

* `monet_fast`: `latent_forward` — the whole batch segment by segment over one KV cache.
* `reference`: `reference_latent_forward` — the reference's loop (per sample, per latent step,
  then a second full forward), with its own mask/detach semantics (mask_mode="reference").

A step = engine forward + backward + optimizer step on a stage-2 batch (K = 8, teacher
alignment with the latent-only proxy). Reports samples/s, peak memory of the step (CUDA
allocator peak on GPU; RSS high-water mark above the start on CPU, which hardly moves for the
tiny model), the activations saved for backward (`saved_act_mib`, exact on any device) and the
speed-up. `benchmarks/bench_train_step.py` runs the same cases under
pytest-benchmark.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from monet_fast.bench.common import BenchReport, matches, no_match, time_fn
from monet_fast.bench.latent_forward import MODEL_SIZES, peak_memory_mib
from monet_fast.model.arch import arch_of

PROVIDERS = ("monet_fast", "reference")
LATENT_SIZE = 8


@dataclass(frozen=True)
class Case:
    size: str  # a key of MODEL_SIZES
    batch_size: int
    zero_stage: int = 2

    @property
    def label(self) -> str:
        return f"{self.size} stage2 B={self.batch_size} ZeRO-{self.zero_stage}"


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("tiny", 4), Case("tiny", 8)]
    sizes = ["tiny", "mid"]
    if torch.cuda.is_available():
        sizes.append("7b-width-2-layers")
    return [Case(s, b) for s in sizes for b in (1, 4, 8)]


CASES = cases(quick=False)


def setup_case(case: Case, provider: str) -> Callable[[], None]:
    """Build model, batch, teacher and a DeepSpeed engine; return one training step."""
    from monet_fast._optional import require

    deepspeed = require("deepspeed", "the train-step benchmark")

    from monet_fast.data import collate, make_samples
    from monet_fast.model.latent import latent_forward
    from monet_fast.model.latent_reference import reference_latent_forward
    from monet_fast.model.losses import LossConfig
    from monet_fast.model.tiny import tiny_model
    from monet_fast.train.config import config_from_dict
    from monet_fast.train.data import ce_weight_of
    from monet_fast.train.engine_setup import (
        build_deepspeed_config,
        build_optimizer,
        setup_distributed,
    )
    from monet_fast.train.loop import LatentTrainModule
    from monet_fast.train.recipe_base import _quiet_deepspeed

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    dist = setup_distributed()
    bf16 = dist.device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    model, processor = tiny_model(seed=0, latent_size=LATENT_SIZE, **MODEL_SIZES[case.size])
    model = model.to(dist.device, dtype).train()
    arch_of(model).visual(model).requires_grad_(False)  # frozen in SFT, as in the reference

    batch = collate(
        make_samples(case.batch_size, seed=1), processor, "stage2", latent_size=LATENT_SIZE
    )
    with torch.no_grad():
        states = latent_forward(model, batch, return_states=True).obs_states
    g = torch.Generator(device=dist.device).manual_seed(0)
    teacher = [
        s + 0.1 * torch.randn(s.shape, generator=g, device=s.device, dtype=s.dtype) for s in states
    ]

    cfg = config_from_dict(
        {
            "stage": 2,
            "output": "unused",
            "model": {"tiny_seed": 0},
            "teacher": {"mode": "online"},
            "optim": {"lr": 1e-5},
            "trainer": {"micro_batch_size": case.batch_size, "grad_accum": 1},
            "deepspeed": {"zero_stage": case.zero_stage},
        }
    ).validate()
    forward_fn = latent_forward if provider == "monet_fast" else reference_latent_forward
    module = LatentTrainModule(model, LossConfig(), forward_fn)
    optimizer = build_optimizer(module, cfg.optim, fused=bf16)
    _quiet_deepspeed()
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        config=build_deepspeed_config(cfg, dist.world_size, bf16),
        dist_init_required=False,
    )
    # Loss normalisers as the recipe computes them before the forward (one micro-batch here).
    ce_total = ce_weight_of(batch, LossConfig().obs_weight_for("stage2"))

    def step() -> None:
        out = engine(batch, teacher, ce_total=ce_total, align_total=float(case.batch_size))
        engine.backward(out["objective"], scale_wrt_gas=False)
        engine.step()

    step.engine = engine  # for tests and inspection
    return step


def saved_activation_mib(fn: Callable[[], None]) -> float:
    """MiB of distinct tensor storages autograd saves for backward during one call of `fn`.

    Device-independent and exact, unlike the CPU RSS high-water mark (the allocator reuses
    freed pages, so RSS barely moves for a small model): the memory the forward keeps alive.
    """
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[(t.device.type, st.data_ptr())] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def _interleaved_seconds(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, list[float]]:
    """Wall times per provider, timing the providers in alternation (one call each per round)
    so that load from other processes hits both alike; one warm-up call each first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(time_fn(fn, warmup=0, reps=1))
    return times


def run(quick: bool = False, only: str | None = None) -> BenchReport:
    report = BenchReport(name="train-step (stage-2 SFT step on DeepSpeed)")
    reps = 5 if quick else 7
    selected = [c for c in cases(quick) if matches(c.label, only)]
    if not selected:
        return no_match(report, only, [c.label for c in cases(quick)])
    for case in selected:
        fns = {provider: setup_case(case, provider) for provider in PROVIDERS}
        times = _interleaved_seconds(fns, reps)
        memory = {p: (peak_memory_mib(fn), saved_activation_mib(fn)) for p, fn in fns.items()}
        del fns
        # Speed-up per round (both providers timed back to back), then its median and range:
        # the ratio within a round is far steadier than either time on a shared machine.
        ratios = sorted(b / a for a, b in zip(times["monet_fast"], times["reference"]))
        for provider in PROVIDERS:
            seconds = statistics.median(times[provider])
            row = dict(
                config=case.label,
                provider=provider,
                seconds=seconds,
                seconds_range=f"{min(times[provider]):.3g}-{max(times[provider]):.3g}",
                samples_per_s=case.batch_size / seconds,
                peak_mib=memory[provider][0],
                saved_act_mib=memory[provider][1],
            )
            if provider == "monet_fast":
                row.update(
                    speedup=statistics.median(ratios),
                    speedup_range=f"{ratios[0]:.3g}-{ratios[-1]:.3g}",
                )
            report.add(**row)
    report.notes = (
        "One optimizer step (forward + backward + AdamW step) through the same DeepSpeed engine "
        "config; seconds: median (range) of interleaved rounds; speedup: median (range) over "
        "rounds of reference seconds / monet_fast seconds in the same round. reference = the "
        "two-pass per-sample/per-latent loop (reference mask/detach semantics). peak_mib: CUDA allocator peak (GPU) or RSS growth (CPU); saved_act_mib: "
        "storages saved for backward."
    )
    return report


__all__ = ["CASES", "PROVIDERS", "Case", "cases", "run", "setup_case"]
