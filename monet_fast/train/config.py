"""Typed SFT training configs: the SFT sections over the shared schema (`config_schema`).

A config is a YAML mapping with one section per concern (see `configs/tiny/stage2.yaml` for a
commented example). Loading goes YAML -> overrides -> typed dataclasses -> `validate()`, so a bad
value is reported before any model is built, with the key, the bad value and what is allowed:

    cfg = load_config("configs/tiny/stage2.yaml", ["optim.lr=1e-3", "trainer.max_steps=20"])

The sections VLPO shares (model, data basics, optim, scheduler, trainer basics, deepspeed,
logging) and their validation live in `monet_fast.train.config_schema`; this module adds the
stage, the teacher, the loss weights and the SFT trainer/eval fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from monet_fast.stage import SFT_STAGE_NUMBERS, Stage
from monet_fast.train.config_schema import (
    ConfigError,
    DataSection,
    DeepSpeedSection,
    LoggingSection,
    LoraSection,
    ModelSection,
    OptimSection,
    RunConfig,
    SchedulerSection,
    TrainerBasics,
    _one_of,
    _positive,
    _validate_data,
    apply_overrides,
    config_from_mapping,
    load_run_config,
    read_yaml_config,
)

STAGES: tuple[int, ...] = SFT_STAGE_NUMBERS
TEACHER_MODES: tuple[str, ...] = ("none", "online", "cache")
PRECOMPUTE_MODES: tuple[str, ...] = ("auto", "never")
CACHE_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")


@dataclass
class TeacherSection:
    """Teacher targets for stages 2 (observation states) and 3 (latent trajectories)."""

    mode: str = "none"  # none (stage 1) | online | cache
    model: str | None = None  # teacher model directory; None = the student's init model
    cache_dir: str | None = None  # None = <output>/teacher_cache
    layers: str | list[int] = "all"  # "all" or hidden-state indices (0 = embeddings)
    dtype: str = "bfloat16"  # cache dtype: bfloat16 | float16 | float32
    precompute: str = "auto"  # auto = fill missing entries before training | never = error
    batch_size: int = 4  # samples per teacher forward while precomputing
    shard_size: int = 256  # samples per safetensors shard


@dataclass
class LossSection:
    """Loss weights; None means the reference value for the stage."""

    obs_weight: float | None = None  # observation CE weight (reference: 2.0 stage 1, 4.0 after)
    align_weight: float = 2.0
    latent_proxy_weight: float = 2.0  # stage 2: alignment reaches params only via latents
    # Axis of the alignment cosine: hidden (default, cos between hidden vectors) | reference
    # (the reference's cosine over the position axis, what the released checkpoints used).
    align_cosine: str = "hidden"
    # CE without [N, V] logits: rows per chunk of the chunked linear + cross-entropy
    # (monet_fast.model.chunked_ce, equal to the plain loss in fp32); 0 = plain full-vocab logits.
    ce_chunk_size: int = 0
    # True: <observation>/</observation> carry CE, so the model learns to open an observation
    # after a latent block at inference. The reference ignores them (False).
    observation_tags: bool = False


@dataclass
class TrainerSection(TrainerBasics):
    """SFT: steps are optimizer steps."""

    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class EvalSection:
    every: int = 0  # optimizer steps between evaluations; 0 = never
    data: DataSection | None = None
    max_batches: int | None = None


@dataclass
class TrainConfig(RunConfig):
    """A whole SFT run. `source` is the YAML file it came from (for relative paths)."""

    stage: int | None = None
    seed: int = 42
    output: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    eval: EvalSection = field(default_factory=EvalSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    source: str | None = None

    @property
    def student_stage(self) -> Stage:
        """The `Stage` this config trains (`stage:` in the YAML is its number)."""
        return Stage.of(self.stage)

    def _validate_first(self) -> None:
        if self.stage is None:
            raise ConfigError(
                "stage is not set: pass --stage {1,2,3} or put `stage:` in the config"
            )
        _one_of("stage", self.stage, STAGES)

    def _validate_recipe(self) -> None:
        _validate_sft(self)


def config_from_dict(values: dict, source: str | None = None) -> TrainConfig:
    """A TrainConfig from a plain mapping (not yet validated)."""
    return config_from_mapping(TrainConfig, values, source)


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    stage: int | None = None,
) -> TrainConfig:
    """Read a YAML config, apply overrides, check the stage, validate.

    `stage` (the CLI's `--stage`) fills a config without one and must agree with one that has it.
    """

    def fill_stage(values: dict, source: str | None) -> None:
        if stage is None:
            return
        if values.get("stage") is not None and values["stage"] != stage:
            raise ConfigError(
                f"--stage {stage} disagrees with stage: {values['stage']} in {source}; "
                "use the config of the stage you train"
            )
        values["stage"] = stage

    return load_run_config(TrainConfig, path, overrides, fill_stage)


def _validate_sft(cfg: TrainConfig) -> None:
    """What only SFT has: data, teacher, loss, gradient accumulation, eval data."""
    m = cfg.model
    _validate_data(cfg.data, "data")

    t = cfg.teacher
    _one_of("teacher.mode", t.mode, TEACHER_MODES)
    _one_of("teacher.dtype", t.dtype, CACHE_DTYPES)
    _one_of("teacher.precompute", t.precompute, PRECOMPUTE_MODES)
    _positive("teacher.batch_size", t.batch_size)
    _positive("teacher.shard_size", t.shard_size)
    if isinstance(t.layers, str) and t.layers != "all":
        raise ConfigError(
            f"teacher.layers must be 'all' or a list of layer indices, got {t.layers!r}"
        )
    if isinstance(t.layers, list) and not t.layers:
        raise ConfigError("teacher.layers must not be empty (use 'all' for every layer)")
    if cfg.stage == 1 and t.mode != "none":
        raise ConfigError(f"stage 1 has no teacher: teacher.mode must be 'none', got {t.mode!r}")
    if cfg.stage in (2, 3) and t.mode == "none":
        what = "stage-1 observation states" if cfg.stage == 2 else "stage-2 latent trajectories"
        raise ConfigError(
            f"stage {cfg.stage} aligns to {what}: teacher.mode must be 'online' or 'cache'"
        )

    if cfg.stage == 3 and t.model is None and m.init is not None:
        raise ConfigError(
            "stage 3 distils the STAGE-2 model's latents: set teacher.model to the stage-2 model "
            "directory (--init names the model to train, the stage-1 model in the reference)"
        )

    lo = cfg.loss
    for name in ("obs_weight", "align_weight", "latent_proxy_weight"):
        _positive(f"loss.{name}", getattr(lo, name), allow_zero=True)
    from monet_fast.model.losses import ALIGN_COSINES

    _one_of("loss.align_cosine", lo.align_cosine, ALIGN_COSINES)
    _positive("loss.ce_chunk_size", lo.ce_chunk_size, allow_zero=True)

    _positive("trainer.grad_accum", cfg.trainer.grad_accum)

    ev = cfg.eval
    _positive("eval.max_batches", ev.max_batches)
    if ev.every and ev.data is None:
        raise ConfigError("eval.every is set but eval.data is not (a data section)")
    if ev.data is not None:
        _validate_data(ev.data, "eval.data")


__all__ = [
    "CACHE_DTYPES",
    "ConfigError",
    "DataSection",
    "DeepSpeedSection",
    "EvalSection",
    "LoggingSection",
    "LoraSection",
    "LossSection",
    "ModelSection",
    "OptimSection",
    "SchedulerSection",
    "TeacherSection",
    "TrainConfig",
    "TrainerSection",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "read_yaml_config",
]
