"""Evaluation loop: batched latent decoding of a benchmark under each intervention, then scoring,
paired Δaccuracy with bootstrap CIs, collapse metrics and the report.

`none` runs first: it is the baseline every Δ is measured against and the donor bank of
`shuffle` (latents of another sample at the same step). `latent_mode` says whether the model
decides to open latent blocks (`auto`, what the trigger rate measures), never may (`off`:
`<abs_vis_token>` masked out of the logits in every run) or must (`force`: every prompt ends with
`<abs_vis_token>`, so each answer begins with a latent block). How each intervention reaches the
decoder:
  zero / constant / noise / shuffle  -> `latent_transform` (each fed-back vector replaced)
  mask                               -> `hide_latents` (a closed block's slots hidden from later tokens)
  no-latent                          -> `<abs_vis_token>` masked out of the logits (no block opens)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from monet_fast.data.types import Sample
from monet_fast.decode import generate
from monet_fast.eval.interventions import LatentIntervention, parse_interventions
from monet_fast.eval.report import build_report, write_report
from monet_fast.model.config import get_latent_config
from monet_fast.model.feedback import embedding_norm
from monet_fast.model.sequence import render_prompt
from monet_fast.model.tokens import LATENT_START
from monet_fast.tasks.judge import OpenAIJudge
from monet_fast.tasks.scoring import ScoredItem, score_predictions

LATENT_MODES: tuple[str, ...] = ("auto", "off", "force")


@dataclass
class EvalConfig:
    """Settings of one evaluation run."""

    interventions: list[str] = field(default_factory=lambda: ["none"])
    batch_size: int = 8
    max_new_tokens: int = 64
    latent_size: int | None = None  # default: the model config's
    seed: int = 0
    judge: OpenAIJudge | None = None
    progress: bool = True
    latent_mode: str = "auto"  # auto | off | force (see the module docstring)

    def __post_init__(self) -> None:
        self.interventions = parse_interventions(self.interventions)
        if self.latent_mode not in LATENT_MODES:
            raise ValueError(
                f"latent_mode must be one of {list(LATENT_MODES)}, got {self.latent_mode!r}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.latent_size is not None and self.latent_size < 1:
            raise ValueError(f"latent_size must be >= 1, got {self.latent_size}")


@dataclass
class InterventionRun:
    """Outputs of one intervention over all samples, in sample order."""

    texts: list[str]
    traces: list[torch.Tensor]  # per sample [n_latents, H] (fed-back vectors, flat)
    fired: list[bool]  # per sample: opened at least one latent block
    items: list[ScoredItem]
    tokens: int
    seconds: float


def _no_start(start_id: int):
    def processor(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logits[:, start_id] = float("-inf")
        return logits

    return processor


def _flat(latents: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[n_blocks, K, H] + real counts per block -> [n_latents, H]."""
    if not counts:
        return latents.new_zeros(0, latents.shape[-1])
    return torch.cat([latents[i, :n] for i, n in enumerate(counts)])


def run_intervention(
    model,
    processor,
    samples: list[Sample],
    iv: LatentIntervention,
    cfg: EvalConfig,
) -> InterventionRun:
    """Decode every sample with intervention `iv` applied and score the answers."""
    start_id = get_latent_config(model).latent_start_id
    texts: list[str] = []
    traces: list[torch.Tensor] = []
    fired: list[bool] = []
    tokens = 0
    forced = LATENT_START if cfg.latent_mode == "force" else ""
    banned = iv.skips_latent_blocks or cfg.latent_mode == "off"
    t0 = time.perf_counter()
    batches = range(0, len(samples), cfg.batch_size)
    bar = tqdm(batches, desc=f"eval [{iv.name}]", disable=not cfg.progress, unit="batch")
    for lo in bar:
        chunk = samples[lo : lo + cfg.batch_size]
        inputs = [{"text": render_prompt(s) + forced, "images": s.question_images} for s in chunk]
        rows = torch.arange(lo, lo + len(chunk))
        transform = None
        if iv.modifies_vectors:

            def transform(h: torch.Tensor, index: torch.Tensor, rows=rows) -> torch.Tensor:
                return iv.transform(h, rows[: h.shape[0]].to(h.device), index)

        out = generate(
            model,
            processor,
            inputs,
            max_new_tokens=cfg.max_new_tokens,
            latent_size=cfg.latent_size,
            return_latents=True,
            latent_transform=transform,
            hide_latents=iv.masks_latent_slots,
            logits_processor=_no_start(start_id) if banned else None,
        )
        texts += out.texts
        tokens += sum(len(s) for s in out.sequences)
        traces += [_flat(lat, n) for lat, n in zip(out.latents, out.latent_counts)]
        fired += [len(n) > 0 for n in out.latent_counts]
    seconds = time.perf_counter() - t0
    items = score_predictions(texts, samples, cfg.judge)
    return InterventionRun(
        texts=texts, traces=traces, fired=fired, items=items, tokens=tokens, seconds=seconds
    )


def evaluate(
    model,
    processor,
    samples: list[Sample],
    cfg: EvalConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every intervention of `cfg` on `samples` and build (and optionally write) the report."""
    cfg = cfg or EvalConfig()
    if not samples:
        raise ValueError("no samples to evaluate")
    runs: dict[str, InterventionRun] = {}
    skipped: dict[str, str] = {}
    for name in cfg.interventions:
        iv = LatentIntervention(name, seed=cfg.seed)
        if iv.needs_fit:
            try:
                iv.fit(runs["none"].traces)
            except ValueError as err:  # e.g. shuffle when fewer than 2 samples produced latents
                skipped[name] = str(err)
                continue
        runs[name] = run_intervention(model, processor, samples, iv, cfg)
    report = build_report(
        {name: run.items for name, run in runs.items()},
        {name: run.traces for name, run in runs.items()},
        fired={name: run.fired for name, run in runs.items()},
        embedding_norm=float(embedding_norm(model)),
        meta={
            "n_eval": len(samples),
            "latent_size": cfg.latent_size or get_latent_config(model).latent_size,
            "max_new_tokens": cfg.max_new_tokens,
            "latent_mode": cfg.latent_mode,
            "feedback_norm": get_latent_config(model).feedback_norm,
            **(meta or {}),
        },
        seed=cfg.seed,
    )
    report["throughput"] = {
        name: {"tokens_per_s": run.tokens / max(run.seconds, 1e-9), "seconds": run.seconds}
        for name, run in runs.items()
    }
    report["skipped_interventions"] = skipped
    report["predictions"] = {
        name: [{**item.to_dict(), "fired": f} for item, f in zip(run.items, run.fired)]
        for name, run in runs.items()
    }
    if out_dir is not None:
        write_report(out_dir, report)
    return report
