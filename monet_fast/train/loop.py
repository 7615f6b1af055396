"""The shared SFT training loop on DeepSpeed; the stage recipes in `sft.py` specialise it.

One optimizer step, as the loop runs it (every rank):

    micro-batches = this rank's grad_accum slices of the global batch   (train/data.py)
    [online teacher: targets for each micro-batch]
    totals = all_reduce(Σ CE weights, Σ aligned samples)                 before any forward
    for each micro-batch:
        out = latent_forward(...)                                         via the engine
        objective = ce_sum / total_ce_weight
                  + (out.loss - out.ce_loss) · align_count / total_aligned
        engine.backward(objective · world_size, scale_wrt_gas=False); engine.step()

Normalisation: CE is normalised by the total CE weight (target tokens, observation tokens
weighted) of the whole optimizer step over all micro-batches and ranks, so gradient accumulation
and data parallelism give exactly the gradient of one big batch. `out.loss - out.ce_loss` is the
alignment part of the stage loss normalised per micro-batch (align_weight · mean over samples);
rescaling it by align_count / total_aligned turns it into the mean over all samples of the step.
In stage 2 that part carries the latent-only proxy gradient (its value is the true weighted
alignment; only its gradient is routed through the latents), and the rescale is linear, so the
routing is kept. DeepSpeed would divide by grad_accum (we pass scale_wrt_gas=False) and averages
gradients over data-parallel ranks (hence the · world_size).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from monet_fast.model.losses import LossConfig
from monet_fast.train import checkpoint as ckpt
from monet_fast.train.config import ConfigError, TrainConfig
from monet_fast.train.data import (
    DataReport,
    MicroBatch,
    SFTCollator,
    dataset_fingerprint,
    epoch_order,
    load_samples,
    micro_batch_loader,
    rank_micro_batches,
)
from monet_fast.train.engine_setup import (  # noqa: F401 (re-exported)
    DistInfo,
    _all_reduce_sum,
    _barrier,
    _deep_merge,
    _fill,
    _free_port,
    build_deepspeed_config,
    build_optimizer,
    lr_lambda,
    seed_everything,
    setup_distributed,
)
from monet_fast.train.metrics import MetricsLogger
from monet_fast.train.recipe_base import RecipeBase

logger = logging.getLogger("monet_fast.train")


# --------------------------------------------------------------------------------------------
# The module DeepSpeed wraps
# --------------------------------------------------------------------------------------------


class LatentTrainModule(nn.Module):
    """Wraps the HF model so that `engine(batch, ...)` runs the latent forward and returns the
    step objective (DeepSpeed hooks its backward bookkeeping on the returned tensor).

    forward_fn: `latent_forward` (ours) or `reference_latent_forward` (benchmark baseline).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_config: LossConfig,
        forward_fn: Callable | None = None,
        teacher_layers: list[int] | None = None,
    ) -> None:
        super().__init__()
        if forward_fn is None:
            from monet_fast.model.latent import latent_forward as forward_fn
        self.model = model
        self.loss_config = loss_config
        self.forward_fn = forward_fn
        self.teacher_layers = teacher_layers

    def forward(
        self,
        batch: dict,
        teacher: list[torch.Tensor] | None = None,
        *,
        ce_total: float = 1.0,
        align_total: float = 1.0,
        scale: float = 1.0,
    ) -> dict[str, Any]:
        kwargs = {} if self.teacher_layers is None else {"teacher_layers": self.teacher_layers}
        out = self.forward_fn(
            self.model, batch, teacher=teacher, loss_config=self.loss_config, **kwargs
        )
        objective = out.ce_sum / max(ce_total, 1.0)
        if out.align_loss is not None and out.align_count > 0 and align_total > 0:
            objective = objective + (out.loss - out.ce_loss) * (out.align_count / align_total)
        return {
            "objective": objective * scale,
            "ce_sum": out.ce_sum.detach(),
            "ce_weight": float(out.ce_weight),
            "align_sum": out.align_sum.detach(),
            "align_count": out.align_count,
        }


# --------------------------------------------------------------------------------------------
# The recipe base class
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    output: Path
    global_step: int
    losses: list[float] = field(default_factory=list)  # this run's optimizer steps
    checkpoint: Path | None = None
    export: Path | None = None
    seconds: float = 0.0
    samples_per_s: float = 0.0


class SFTRecipe(RecipeBase):
    """SFT on DeepSpeed: shared loop for stages 1-3 (subclasses in `sft.py` add the teacher).
    A sibling of `VLPORecipe` over `recipe_base.RecipeBase` (set-up, engine, checkpoints,
    resume, export).

    Features: ZeRO-2 by default (ZeRO-3 / CPU offload by config), bf16 on GPU and fp32 on CPU,
    gradient checkpointing (every stage; cache-safe in stages 2/3), gradient accumulation with
    loss normalised by target tokens over all micro-batches and ranks, LR warm-up +
    linear/cosine decay, frozen vision tower, seeded deterministic data order, atomic
    periodic/final checkpoints, exact resume, HF export, JSONL metrics + progress bar
    (+ TensorBoard / wandb).

    Raises (ConfigError, at construction or set-up):
        - stage not 1/2/3, or `--stage` disagreeing with the config's stage;
        - no model (neither model.init nor model.tiny_seed);
        - bf16 without a GPU;
        - a teacher for stage 1, or none for stages 2/3;
        - stage 3 from a model directory without teacher.model (the stage-2 model);
        - teacher.layers out of range for the model;
        - a dataset smaller than one global batch;
        - a DeepSpeed JSON that defines optimizer/scheduler or contradicts the config;
        - existing checkpoints in the output directory without `--resume`, or `--resume` with none;
        - (FileNotFoundError / MissingTeacherEntry) teacher.precompute=never with an
          incomplete teacher cache.
    """

    stage: ClassVar[int] = 0

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: str | None = None,
        forward_fn: Callable | None = None,
    ) -> None:
        super().__init__(cfg, resume=resume)
        if self.stage and cfg.stage != self.stage:
            raise ConfigError(
                f"{type(self).__name__} trains stage {self.stage}, config has {cfg.stage}"
            )
        self.forward_fn = forward_fn
        self.loss_config = LossConfig(
            obs_weight=cfg.loss.obs_weight,
            align_weight=cfg.loss.align_weight,
            latent_proxy_weight=cfg.loss.latent_proxy_weight,
            align_cosine=cfg.loss.align_cosine,
            ce_chunk_size=cfg.loss.ce_chunk_size,
        )
        self.obs_weight = self.loss_config.obs_weight_for(cfg.student_stage)
        self.online_teacher = None
        self.teacher_cache = None
        self.teacher_layers: list[int] | None = None

    # ---- stage hooks ------------------------------------------------------------------------

    def setup_teacher(self) -> None:
        """Stage hook: set `online_teacher` or `teacher_cache` (+ `teacher_layers`)."""

    # ---- set-up -----------------------------------------------------------------------------

    def setup_common(self, *, check_checkpoints: bool = True) -> None:
        """Distributed init, seeds, run directory, data. (Also used by teacher precompute.)"""
        cfg = self.cfg
        self.setup_runtime()
        if check_checkpoints:
            self.refuse_existing_checkpoints()
        self.write_run_files()
        self.samples, self.data_report = load_samples(cfg.data)
        self.write_data_report()
        tr = cfg.trainer
        self.global_batch = tr.micro_batch_size * tr.grad_accum * self.world
        self.steps_per_epoch = len(self.samples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the dataset has {len(self.samples)} samples, fewer than one global batch "
                f"(micro_batch_size {tr.micro_batch_size} x grad_accum {tr.grad_accum} x "
                f"{self.world} ranks = {self.global_batch})"
            )
        self.total_steps = cfg.scheduler.total_steps or tr.epochs * self.steps_per_epoch
        self.stop_step = tr.max_steps or tr.epochs * self.steps_per_epoch

    def setup(self) -> None:
        """Build everything: data, model, teacher, DeepSpeed engine; load a checkpoint if resuming."""

        self.setup_common()
        cfg = self.cfg
        t0 = time.perf_counter()
        self.prepare_policy(cfg.model.init)
        self.setup_teacher()

        self.collator = SFTCollator(
            self.processor,
            cfg.student_stage,
            cfg.model.latent_size,
            self.obs_weight,
            image_budget=cfg.data.image_budget,
            cache=self.teacher_cache,
            on_error=cfg.data.on_error,
            label_observation_tags=cfg.loss.observation_tags,
            with_teacher=self.teacher_cache is not None or self.online_teacher is not None,
        )
        module = LatentTrainModule(
            self.model, self.loss_config, self.forward_fn, self.teacher_layers
        )
        offload = cfg.deepspeed.offload_optimizer
        optimizer = build_optimizer(
            module, cfg.optim, fused=self.device.type == "cuda" and not offload
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.scheduler, self.total_steps)
        )
        self.ds_config = build_deepspeed_config(cfg, self.world, self.bf16)
        self.zero_stage = int(self.ds_config["zero_optimization"]["stage"])
        self.init_engine(module, optimizer, scheduler)

        self.progress = ckpt.TrainingProgress(
            seed=cfg.seed,
            global_batch_size=self.global_batch,
            dataset_fingerprint=dataset_fingerprint(self.samples),
            n_samples=len(self.samples),
            world_size=self.world,
        )
        self.progress = self.resume_progress(self.progress, ckpt.load_checkpoint)

        self.metrics = MetricsLogger(
            self.output,
            cfg.logging,
            rank=self.rank,
            total_steps=self.stop_step,
            initial_step=self.progress.global_step,
            run_config=cfg.to_dict(),
        )
        self.metrics.event(
            "resume" if self.resume is not None else "start",
            step=self.progress.global_step,
            stage=cfg.stage,
            world_size=self.world,
            global_batch=self.global_batch,
            n_samples=len(self.samples),
            skipped_rows=self.data_report.n_skipped,
            setup_s=time.perf_counter() - t0,
        )

    # ---- training ---------------------------------------------------------------------------

    def _train_step(self, micro: list[MicroBatch]) -> dict[str, float]:
        if self.online_teacher is not None:
            for mb in micro:
                mb.teacher = self.online_teacher(mb.samples)
        ce_total, align_total, tokens, n_samples, skipped = _all_reduce_sum(
            [
                sum(mb.ce_weight for mb in micro),
                sum(mb.align_count for mb in micro),
                sum(mb.n_tokens for mb in micro),
                sum(len(mb.samples) for mb in micro),
                sum(len(mb.skipped) for mb in micro),
            ],
            self.device,
        )
        lr = float(self.engine.get_lr()[0])  # the LR this step uses (the schedule steps after)
        ce_sum = align_sum = 0.0
        for mb in micro:
            out = self.engine(
                mb.batch, mb.teacher, ce_total=ce_total, align_total=align_total, scale=self.world
            )
            if abs(out["ce_weight"] - mb.ce_weight) > 1e-3 * max(1.0, mb.ce_weight):
                raise RuntimeError(
                    f"CE weight computed before the forward ({mb.ce_weight}) differs from the "
                    f"forward's ({out['ce_weight']}): loss normalisation would be wrong"
                )
            self.engine.backward(out["objective"], scale_wrt_gas=False)
            self.engine.step()
            ce_sum += float(out["ce_sum"])
            align_sum += float(out["align_sum"])
        ce_sum, align_sum = _all_reduce_sum([ce_sum, align_sum], self.device)
        ce_loss = ce_sum / max(ce_total, 1.0)
        align_loss = align_sum / align_total if align_total > 0 else None
        loss = ce_loss + (self.loss_config.align_weight * align_loss if align_loss else 0.0)
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": loss,
            "ce_loss": ce_loss,
            "align_loss": align_loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "samples": int(n_samples),
            "tokens": int(tokens),
            "skipped_samples": int(skipped),
        }

    def train(self) -> TrainResult:
        """Run optimizer steps until `stop_step`; checkpoint periodically and at the end; export."""
        cfg, tr, p = self.cfg, self.cfg.trainer, self.progress
        result = TrainResult(output=self.output, global_step=p.global_step)
        t_start = time.perf_counter()
        n_samples_run = 0
        # A resumed run already has a checkpoint of its starting step.
        last_saved = p.global_step if self.resume is not None else None
        while p.global_step < self.stop_step:
            order = epoch_order(len(self.samples), cfg.seed, p.epoch, tr.shuffle)
            steps = range(p.step_in_epoch, self.steps_per_epoch)
            lists = [
                mb
                for s in steps
                for mb in rank_micro_batches(
                    order, s, tr.micro_batch_size, tr.grad_accum, self.world, self.rank
                )
            ]
            loader = micro_batch_loader(self.samples, lists, self.collator, cfg.data.num_workers)
            for _ in steps:
                if p.global_step >= self.stop_step:
                    break
                t0 = time.perf_counter()
                micro = [next(loader) for _ in range(tr.grad_accum)]
                stats = self._train_step(micro)
                dt = time.perf_counter() - t0
                p.step_in_epoch += 1
                p.global_step += 1
                p.samples_seen += stats["samples"]
                p.tokens_seen += stats["tokens"]
                n_samples_run += stats["samples"]
                result.losses.append(stats["loss"])
                evaluated = {}
                if cfg.eval.every and p.global_step % cfg.eval.every == 0:
                    evaluated = self.evaluate()
                if (
                    evaluated
                    or p.global_step % tr.log_every == 0
                    or p.global_step == self.stop_step
                ):
                    self.metrics.log(
                        p.global_step,
                        {
                            **stats,
                            **evaluated,
                            "epoch": p.epoch,
                            "samples_per_s": stats["samples"] / dt,
                            "tokens_per_s": stats["tokens"] / dt,
                            "step_s": dt,
                            "elapsed_s": time.perf_counter() - t_start,
                        },
                    )
                self.metrics.advance()
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(f"loss is {stats['loss']} at step {p.global_step}")
                if tr.save_every and p.global_step % tr.save_every == 0:
                    result.checkpoint = self.save_checkpoint()
                    last_saved = p.global_step
            if p.step_in_epoch >= self.steps_per_epoch:
                p.epoch += 1
                p.step_in_epoch = 0
        if last_saved != p.global_step:
            result.checkpoint = self.save_checkpoint()
        if tr.export:
            result.export = self.export()
        result.global_step = p.global_step
        result.seconds = time.perf_counter() - t_start
        result.samples_per_s = n_samples_run / max(result.seconds, 1e-9)
        self.metrics.event("end", step=p.global_step, seconds=result.seconds)
        return result

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean CE of the student on eval.data (rank-strided micro-batches, teacher-free)."""
        from monet_fast.model.latent import latent_forward

        cfg = self.cfg
        samples, _ = load_samples(cfg.eval.data)
        mbs = cfg.trainer.micro_batch_size
        lists = [list(range(i, min(i + mbs, len(samples)))) for i in range(0, len(samples), mbs)]
        lists = lists[self.rank :: self.world]
        if cfg.eval.max_batches is not None:
            lists = lists[: cfg.eval.max_batches]
        collator = SFTCollator(
            self.processor,
            cfg.student_stage,
            cfg.model.latent_size,
            self.obs_weight,
            image_budget=cfg.data.image_budget,
            on_error=cfg.eval.data.on_error,
            label_observation_tags=cfg.loss.observation_tags,
        )
        self.model.eval()
        ce_sum = ce_w = 0.0
        try:
            for mb in micro_batch_loader(samples, lists, collator):
                out = latent_forward(self.model, mb.batch, loss_config=self.loss_config)
                ce_sum += float(out.ce_sum)
                ce_w += float(out.ce_weight)
        finally:
            self.model.train()
        ce_sum, ce_w = _all_reduce_sum([ce_sum, ce_w], self.device)
        return {"eval_ce_loss": ce_sum / max(ce_w, 1.0)}

    def cleanup(self) -> None:
        super().cleanup()
        self.online_teacher = None


__all__ = [
    "DataReport",
    "DistInfo",
    "LatentTrainModule",
    "SFTRecipe",
    "TrainResult",
    "build_deepspeed_config",
    "build_optimizer",
    "lr_lambda",
    "seed_everything",
    "setup_distributed",
]
