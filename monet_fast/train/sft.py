"""Monet SFT stages 1-3 as recipes over the shared DeepSpeed loop (`loop.SFTRecipe`).

    python -m monet_fast.train.sft --stage 2 --config configs/tiny/stage2.yaml --output runs/s2
    monet-fast train --stage 2 --config configs/tiny/stage2.yaml --output runs/s2   # same
    torchrun --nproc_per_node 8 -m monet_fast.train.sft --stage 1 --config configs/qwen2_5_vl_7b/stage1.yaml ...

Python: `train(stage=2, config="configs/tiny/stage2.yaml", output="runs/s2", overrides=[...])`.

What each stage trains (REFERENCE.md §2-4):
  * Stage 1 — warm-up SFT on the interleaved sequence, auxiliary images visible; CE with
    observation tokens weighted (reference 2.0). No teacher.
  * Stage 2 — latent SFT: K latent slots after each auxiliary image, stage-2 attention mask;
    CE (observation weight 4.0) + alignment of the student's all-layer observation states to the
    stage-1 teacher's (online or cached), routed to the parameters only through the latents.
  * Stage 3 — latent distillation: auxiliary images replaced by K slots; CE + alignment of the
    all-layer latent-slot states to the stage-2 model's latent trajectories (full gradient).
    The reference initialises stage 3 from the STAGE-1 model (its script's intent); the stage-2
    model is only the teacher.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, ClassVar

from monet_fast.train import teacher as T
from monet_fast.train.config import ConfigError, TrainConfig, load_config
from monet_fast.train.config_schema import build_run_config
from monet_fast.train.data import apply_image_budget
from monet_fast.train.loop import SFTRecipe, TrainResult, _barrier
from monet_fast.train.recipe_base import run_cli

logger = logging.getLogger("monet_fast.train")


class Stage1Recipe(SFTRecipe):
    """Stage 1: plain next-token SFT on the interleaved sequence (auxiliary images inline).

    Loss: weighted CE (observation tokens x loss.obs_weight, reference 2.0), normalised by the
    total CE weight of the optimizer step.
    """

    stage: ClassVar[int] = 1


class _TeacherRecipe(SFTRecipe):
    """Stages 2 and 3: a frozen teacher's all-layer states are alignment targets.

    teacher.mode=online: the teacher model stays loaded and runs on every micro-batch.
    teacher.mode=cache: targets are read from an indexed safetensors cache, built first (all
    ranks share the work, resumable) when entries are missing and teacher.precompute=auto.
    """

    def teacher_path(self) -> str | None:
        t = self.cfg.teacher
        return t.model if t.model is not None else self.cfg.model.init

    def load_teacher(self) -> tuple[Any, Any, str]:
        """(frozen teacher model, its processor, identity string for the cache header)."""
        path = self.teacher_path()
        model, processor = self.load_model(path)
        model.eval().requires_grad_(False)
        return model, processor, T.model_identity(model, path)

    def _resolve_layers(self, model) -> list[int] | None:
        n_states = model.config.text_config.num_hidden_layers + 1
        try:
            return T.resolve_layers(self.cfg.teacher.layers, n_states)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def cache_dir(self) -> Path:
        t = self.cfg.teacher
        return Path(t.cache_dir) if t.cache_dir is not None else self.output / "teacher_cache"

    def cache_header(self, model, identity: str, layers: list[int] | None) -> T.CacheHeader:
        tc = model.config.text_config
        return T.CacheHeader(
            student_stage=self.stage,
            kind=T.TARGET_KIND[self.stage],
            teacher=identity,
            layers=layers,
            n_states=tc.num_hidden_layers + 1,
            hidden_size=tc.hidden_size,
            dtype=self.cfg.teacher.dtype,
            latent_size=self.cfg.model.latent_size,
            image_budget=self.cfg.data.image_budget,
        )

    def setup_teacher(self) -> None:
        t = self.cfg.teacher
        if t.mode == "online":
            model, processor, _ = self.load_teacher()
            self.teacher_layers = self._resolve_layers(model)
            self.online_teacher = T.OnlineTeacher(
                model,
                processor,
                self.cfg.student_stage,
                self.cfg.model.latent_size,
                self.teacher_layers,
            )
            return
        self.teacher_cache = self.prepare_cache()
        self.teacher_layers = self.teacher_cache.header.layers

    def prepare_cache(self) -> T.TeacherCache:
        """Open the teacher cache, first computing missing/stale entries if allowed."""
        t = self.cfg.teacher
        cache_dir = self.cache_dir()
        model, processor, identity = self.load_teacher()
        layers = self._resolve_layers(model)
        header = self.cache_header(model, identity, layers)
        try:
            missing = T.TeacherCache(cache_dir, expect=header).missing(self.samples)
        except FileNotFoundError:
            missing = [s.key for s in self.samples]
        if missing:
            if t.precompute == "never":
                raise T.MissingTeacherEntry(
                    f"teacher cache {cache_dir} lacks {len(missing)} of {len(self.samples)} "
                    f"samples (first: {missing[:5]}) and teacher.precompute=never; run with "
                    "teacher.precompute=auto or `monet-fast train ... --precompute-teacher`"
                )
            if self.rank == 0:
                T.open_or_create_header(cache_dir, header)
                logger.info("teacher cache: computing %s (%d samples)", cache_dir, len(missing))
            _barrier()
            budget = self.cfg.data.image_budget
            T.precompute_teacher_cache(
                model,
                processor,
                self.samples,
                cache_dir,
                header,
                batch_size=t.batch_size,
                shard_size=t.shard_size,
                rank=self.rank,
                world_size=self.world,
                progress=self.rank == 0 and self.cfg.logging.progress,
                prepare=(lambda s: apply_image_budget(s, budget)) if budget else None,
            )
            _barrier()
            if self.rank == 0:
                T.finalize_cache(cache_dir, self.samples, t.shard_size)
            _barrier()
        del model
        cache = T.TeacherCache(cache_dir, expect=header)
        still = cache.missing(self.samples)
        if still:
            raise T.MissingTeacherEntry(
                f"teacher cache {cache_dir} still lacks {len(still)} samples after precompute "
                f"(first: {still[:5]})"
            )
        if self.rank == 0:
            logger.info(
                "teacher cache %s: %d samples, %.2f MiB, %.1f KiB per sample (layers %s, %s)",
                cache_dir,
                len(cache),
                cache.total_bytes / 2**20,
                cache.bytes_per_sample / 2**10,
                "all" if header.layers is None else header.layers,
                header.dtype,
            )
        return cache

    def precompute_teacher(self) -> dict:
        """Only build the teacher cache (no training); returns its size figures."""
        if self.cfg.teacher.mode != "cache":
            raise ConfigError("--precompute-teacher needs teacher.mode=cache")
        self.setup_common(check_checkpoints=False)
        cache = self.prepare_cache()
        return {
            "cache_dir": str(cache.cache_dir),
            "n_samples": len(cache),
            "total_bytes": cache.total_bytes,
            "bytes_per_sample": cache.bytes_per_sample,
        }


class Stage2Recipe(_TeacherRecipe):
    """Stage 2: latent SFT with observation-state alignment to the stage-1 teacher.

    Student sequence: aux image + `<abs_vis_token>` + K slots + `</abs_vis_token>`, stage-2
    mask (observations cannot see the aux image directly). Teacher: the stage-1 model on the
    stage-1 sequence (teacher.model, default: the init model, which is the stage-1 model).
    Loss: CE (obs x4) + align_weight x mean(1 - cos) over layers x observation tokens, whose
    gradient reaches the parameters only through the latents (x latent_proxy_weight).
    """

    stage: ClassVar[int] = 2


class Stage3Recipe(_TeacherRecipe):
    """Stage 3: latent distillation without auxiliary images, targets = stage-2 latents.

    Student sequence: each aux image replaced by `<abs_vis_token>` + K slots + end; causal mask.
    Teacher: the stage-2 model's all-layer states at its latent slots (teacher.model). Init:
    the model named by --init — the reference intends the STAGE-1 model.
    Loss: CE (obs x4) + align_weight x mean(1 - cos) over layers x latent slots (full gradient).
    """

    stage: ClassVar[int] = 3


RECIPES: dict[int, type[SFTRecipe]] = {1: Stage1Recipe, 2: Stage2Recipe, 3: Stage3Recipe}


def build_config(
    stage: int | None,
    config: str | Path | TrainConfig | None,
    overrides: list[str] | None = None,
    *,
    output: str | Path | None = None,
    max_steps: int | None = None,
    init: str | Path | None = None,
) -> TrainConfig:
    """Config file + overrides + the CLI's common flags (which win over the file)."""
    cfg = build_run_config(
        TrainConfig,
        config,
        overrides,
        lambda path, extra: load_config(path, extra, stage=stage),
        output=output,
        max_steps=max_steps,
        init=init,
    )
    # A loaded file already agrees (load_config fills or checks the stage); a given object may not.
    if stage is not None and cfg.stage != stage:
        raise ConfigError(f"stage {stage} requested, config has stage {cfg.stage}")
    return cfg


def train(
    stage: int | None = None,
    config: str | Path | TrainConfig | None = None,
    overrides: list[str] | None = None,
    *,
    output: str | Path | None = None,
    max_steps: int | None = None,
    resume: str | bool | None = None,
    init: str | Path | None = None,
) -> TrainResult:
    """Train one SFT stage; the Python twin of `monet-fast train`.

    resume: True or "latest" = the newest checkpoint in the output directory; a tag
    ("step_0000004") or a checkpoint directory path; None/False = start fresh.
    """
    cfg = build_config(stage, config, overrides, output=output, max_steps=max_steps, init=init)
    if resume is True:
        resume = "latest"
    recipe = RECIPES[cfg.stage](cfg, resume=resume or None)
    return recipe.run()


def precompute_teacher(
    stage: int | None = None,
    config: str | Path | TrainConfig | None = None,
    overrides: list[str] | None = None,
    *,
    output: str | Path | None = None,
    init: str | Path | None = None,
) -> dict:
    """Build a stage-2/3 teacher cache without training (resumable)."""
    cfg = build_config(stage, config, overrides, output=output, init=init)
    if cfg.stage == 1:
        raise ConfigError("stage 1 has no teacher")
    return RECIPES[cfg.stage](cfg).precompute_teacher()


def run_from_args(args: argparse.Namespace) -> int:
    """Execute parsed train arguments; prints a one-line summary on rank 0."""
    if args.precompute_teacher:
        return run_cli(
            lambda: precompute_teacher(
                args.stage, args.config, args.overrides, output=args.output, init=args.init
            ),
            lambda info: json.dumps(info, indent=2),
        )

    def summary(result: TrainResult) -> str:
        last = result.losses[-1] if result.losses else float("nan")
        return (
            f"trained to step {result.global_step} in {result.seconds:.1f}s "
            f"({result.samples_per_s:.2f} samples/s); last loss {last:.4f}; "
            f"checkpoint {result.checkpoint}; export {result.export}"
        )

    return run_cli(
        lambda: train(
            args.stage,
            args.config,
            args.overrides,
            output=args.output,
            max_steps=args.max_steps,
            resume=args.resume_from or args.resume,
            init=args.init,
        ),
        summary,
    )


__all__ = [
    "RECIPES",
    "Stage1Recipe",
    "Stage2Recipe",
    "Stage3Recipe",
    "build_config",
    "precompute_teacher",
    "train",
]


if __name__ == "__main__":  # `python -m monet_fast.train.sft` (what torchrun / deepspeed launch)
    # The entry lives with the CLI (cli.main): the recipe never imports its command line.
    from monet_fast.train.cli import main

    sys.exit(main())
