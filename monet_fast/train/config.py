"""Typed SFT training configs: YAML files, `key=value` overrides, and up-front validation.

A config is a YAML mapping with one section per concern (see `configs/tiny/stage2.yaml` for a
commented example). Loading goes YAML -> overrides -> typed dataclasses -> `validate()`, so a bad
value is reported before any model is built, with the key, the bad value and what is allowed:

    cfg = load_config("configs/tiny/stage2.yaml", ["optim.lr=1e-3", "trainer.max_steps=20"])

Paths: `deepspeed.config` is resolved relative to the YAML file that names it (the JSON ships next
to the YAML files); every other path is relative to the working directory, as on a command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from monet_fast.model.lora import DEFAULT_TARGET_MODULES, QUANTIZE_MODES

STAGES: tuple[int, ...] = (1, 2, 3)
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")
DATA_KINDS: tuple[str, ...] = ("synthetic", "monet_sft")
ON_ERROR_MODES: tuple[str, ...] = ("raise", "skip")
TEACHER_MODES: tuple[str, ...] = ("none", "online", "cache")
PRECOMPUTE_MODES: tuple[str, ...] = ("auto", "never")
CACHE_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
SCHEDULERS: tuple[str, ...] = ("linear", "cosine", "constant")
ZERO_STAGES: tuple[int, ...] = (0, 1, 2, 3)


class ConfigError(ValueError):
    """A config value or combination that training refuses; the message names the key (and,
    when loaded from a file, the file: `in_file`)."""

    def in_file(self, source: str | None) -> ConfigError:
        """The same error prefixed with the config file it came from (once)."""
        text = str(self)
        if source is None or text.startswith(source):
            return self
        return ConfigError(f"{source}: {text}")


@dataclass
class LoraSection:
    """LoRA adapters (peft) instead of full fine-tuning; only the adapters train."""

    r: int = 16  # adapter rank
    alpha: float = 32.0  # scale alpha / r
    dropout: float = 0.05  # on the adapter input (training only)
    # Qwen2.5-VL decoder projections; the vision tower gets none while model.freeze_vision.
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))


@dataclass
class ModelSection:
    """Which model to train and how it is held in memory."""

    init: str | None = None  # model directory (`--init`); None = the tiny model (tiny_seed)
    tiny_seed: int | None = None  # build `tiny_model(seed)` when init is None (tiny configs)
    latent_size: int = 8  # K latent slots per auxiliary image; exported in config.json
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    # Every stage and VLPO; stages 2/3 and the VLPO replay keep the KV cache across the recompute
    # (monet_fast.model.cache_checkpoint).
    gradient_checkpointing: bool = False
    freeze_vision: bool = True  # reference: ViT + merger frozen in every SFT stage
    attn_implementation: str | None = None  # None = transformers' default (sdpa)
    lora: LoraSection | None = None  # set (e.g. `lora: {r: 16}`) to train LoRA adapters only
    quantize: str | None = None  # 4bit | 8bit: QLoRA base weights (bitsandbytes, CUDA, needs lora)


@dataclass
class DataSection:
    """Where samples come from."""

    kind: str = "synthetic"  # synthetic (in memory) | monet_sft (JSON on disk)
    n: int = 64  # synthetic: number of samples
    seed: int = 0  # synthetic: task seed
    start: int = 0  # synthetic: first sample index (disjoint splits)
    path: str | list[str] | None = None  # monet_sft: one train.json or a list of them
    root: str | None = None  # monet_sft: directory image paths are relative to
    # true accepts image paths that are absolute or lead out of `root` (.., symlinks): only
    # for trusted data; false refuses them with an error naming file, row and field.
    allow_outside_root: bool = False
    on_error: str = "raise"  # raise | skip (skipped rows counted in data_report.json)
    limit: int | None = None  # keep the first N samples (after skipping)
    num_workers: int = 0  # DataLoader workers that collate (and read the teacher cache)
    image_budget: list[int] | None = None  # [global_tokens, per_image_tokens] or None


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
class OptimSection:
    name: str = "adamw"  # adamw | sgd (sgd: update = lr * grad, used by equivalence tests)
    lr: float = 1e-5
    weight_decay: float = 0.01  # not applied to biases and norm weights (as HF Trainer)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    grad_clip: float = 1.0  # global norm; 0 disables


@dataclass
class SchedulerSection:
    name: str = "linear"  # linear | cosine | constant (after warm-up)
    warmup_steps: int = 10
    total_steps: int | None = None  # None = epochs x optimizer steps per epoch


@dataclass
class TrainerSection:
    epochs: int = 1
    micro_batch_size: int = 1  # samples per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None  # stop after this optimizer step (schedule unchanged)
    log_every: int = 1
    save_every: int = 0  # optimizer steps between checkpoints; 0 = final checkpoint only
    keep_last: int = 2  # checkpoints kept on disk (older ones deleted after a save)
    shared_filesystem: bool = True  # false: each node keeps its own checkpoint copy (local disks)
    export: bool = True  # write a Hugging Face directory to <output>/hf at the end
    shuffle: bool = True  # reshuffle every epoch from (seed, epoch)


@dataclass
class EvalSection:
    every: int = 0  # optimizer steps between evaluations; 0 = never
    data: DataSection | None = None
    max_batches: int | None = None


@dataclass
class DeepSpeedSection:
    config: str | None = None  # DeepSpeed JSON ("auto" values filled from this config)
    zero_stage: int | None = None  # overrides the JSON; None = JSON's, else 2
    offload_optimizer: bool = False
    offload_param: bool = False  # ZeRO-3 only
    extra: dict = field(default_factory=dict)  # merged into the DeepSpeed config last


@dataclass
class LoggingSection:
    progress: bool = True  # tqdm bar (rank 0) with loss, tokens/s and ETA
    tensorboard: bool = False  # <output>/tensorboard (needs the tensorboard package)
    wandb_project: str | None = None  # log to Weights & Biases (needs wandb)
    wandb_name: str | None = None


class RunConfig:
    """What the SFT and RL configs share: the plain dict and the YAML the run directory keeps."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out

    def dump(self) -> str:
        """The resolved config as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


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
    def student_stage(self) -> str:
        return f"stage{self.stage}"

    def resolved_deepspeed_json(self) -> Path | None:
        if self.deepspeed.config is None:
            return None
        p = Path(self.deepspeed.config)
        if not p.is_absolute() and self.source is not None:
            p = Path(self.source).parent / p
        return p

    def validate(self) -> TrainConfig:
        """Raise ConfigError for every refused value or combination; returns self."""
        _validate(self)
        return self


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts (strict: unknown keys are errors)
# --------------------------------------------------------------------------------------------


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return typing.Union[tuple(args)], optional  # noqa: UP007
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the field type `tp`; ConfigError names `key`."""
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} must not be null")
    if dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _build(base, value, key)
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(base):
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} fits none of the allowed types ({'; '.join(errors)})")
    if origin is list:
        (item_tp,) = typing.get_args(base)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if base is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if base is float:
        # YAML 1.1 reads "1e-5" (no dot) as a string; accept it as the number it means.
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range
                pass
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        # NaN passes every `< 0` check and inf every `> 0` one: refuse both here.
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}; allowed here: {names}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def config_from_dict(values: dict, source: str | None = None) -> TrainConfig:
    """A TrainConfig from a plain mapping (not yet validated)."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a YAML mapping, got {type(values).__name__}")
    cfg = _build(TrainConfig, values)
    cfg.source = source
    return cfg


# --------------------------------------------------------------------------------------------
# Overrides and loading
# --------------------------------------------------------------------------------------------


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings to a nested dict (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, ValueError, RecursionError) as err:
            # ValueError: an integer of more than 4300 digits (Python's int() limit).
            shown = item if len(item) <= 80 else f"{item[:77]}..."
            raise ConfigError(f"override {shown!r}: value is not valid YAML ({err})") from None
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return values


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    stage: int | None = None,
) -> TrainConfig:
    """Read a YAML config, apply overrides, check the stage, validate.

    `stage` (the CLI's `--stage`) fills a config without one and must agree with one that has it.
    """
    values, source = read_yaml_config(path)
    try:
        values = apply_overrides(values, list(overrides or []))
        if stage is not None:
            if values.get("stage") is not None and values["stage"] != stage:
                raise ConfigError(
                    f"--stage {stage} disagrees with stage: {values['stage']} in {source}; "
                    "use the config of the stage you train"
                )
            values["stage"] = stage
        cfg = config_from_dict(values, source)
        return cfg.validate()
    except ConfigError as err:
        raise err.in_file(source) from None


def read_yaml_config(path: str | Path | None) -> tuple[dict, str | None]:
    """(mapping, source path) of a YAML config file; ({}, None) for no file.

    Raises FileNotFoundError for a missing file and ConfigError naming the file for one that
    is not UTF-8, not YAML (with line and column) or not a mapping.
    """
    if path is None:
        return {}, None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p} is not UTF-8 text ({err})") from None
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an int over 4300 digits
        raise ConfigError(f"{p} is not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{p}: YAML nested too deeply") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{p}: a config must be a YAML mapping, got {type(values).__name__}")
    return values, str(p)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key} must be {bound}, got {value!r}")


def _validate_data(d: DataSection, key: str) -> None:
    _one_of(f"{key}.kind", d.kind, DATA_KINDS)
    _one_of(f"{key}.on_error", d.on_error, ON_ERROR_MODES)
    _positive(f"{key}.num_workers", d.num_workers, allow_zero=True)
    _positive(f"{key}.limit", d.limit)
    if d.kind == "synthetic":
        _positive(f"{key}.n", d.n)
        _positive(f"{key}.start", d.start, allow_zero=True)
    elif not d.path:
        raise ConfigError(f"{key}.kind is monet_sft but {key}.path is not set (a train.json)")
    if d.image_budget is not None and (len(d.image_budget) != 2 or min(d.image_budget) <= 0):
        raise ConfigError(
            f"{key}.image_budget must be [global_tokens, per_image_tokens] (both > 0), "
            f"got {d.image_budget!r}"
        )


def validate_adapters(m: ModelSection) -> None:
    """model.lora / model.quantize (shared by the SFT and VLPO configs). The CPU refusal of
    quantize does not import bitsandbytes."""
    if m.lora is not None:
        lo = m.lora
        _positive("model.lora.r", lo.r)
        _positive("model.lora.alpha", lo.alpha)
        if not 0.0 <= lo.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {lo.dropout}")
        if not lo.target_modules or not all(lo.target_modules):
            raise ConfigError(
                f"model.lora.target_modules must name modules, got {lo.target_modules!r}"
            )
    if m.quantize is None:
        return
    _one_of("model.quantize", m.quantize, QUANTIZE_MODES)
    if m.lora is None:
        raise ConfigError(
            f"model.quantize {m.quantize} needs model.lora: a quantized base trains adapters "
            "only (QLoRA); full fine-tuning of quantized weights is not supported"
        )
    if m.init is None:
        raise ConfigError(
            "model.quantize needs model.init (a checkpoint directory to load quantized); the "
            "tiny model is built in code"
        )
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"model.quantize {m.quantize} (QLoRA) needs a CUDA GPU: bitsandbytes' quantized "
            "layers run on CUDA only; on CPU remove model.quantize (plain LoRA works)"
        )


def _validate(cfg: TrainConfig) -> None:
    if cfg.stage is None:
        raise ConfigError("stage is not set: pass --stage {1,2,3} or put `stage:` in the config")
    _one_of("stage", cfg.stage, STAGES)
    m = cfg.model
    _one_of("model.precision", m.precision, PRECISIONS)
    if m.latent_size < 1:
        raise ConfigError(f"model.latent_size must be >= 1, got {m.latent_size}")
    if m.init is None and m.tiny_seed is None:
        raise ConfigError(
            "no model: pass --init DIR (or model.init=DIR), or set model.tiny_seed to build the "
            "tiny test model"
        )
    validate_adapters(m)
    if m.precision == "bf16":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "model.precision bf16 needs a CUDA GPU here; CPU training runs in fp32 "
                "(precision: auto or fp32)"
            )
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

    o = cfg.optim
    _one_of("optim.name", o.name, OPTIMIZERS)
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.eps", o.eps)
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    _positive("optim.momentum", o.momentum, allow_zero=True)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas!r}")

    s = cfg.scheduler
    _one_of("scheduler.name", s.name, SCHEDULERS)
    _positive("scheduler.warmup_steps", s.warmup_steps, allow_zero=True)
    _positive("scheduler.total_steps", s.total_steps)

    tr = cfg.trainer
    for name in ("epochs", "micro_batch_size", "grad_accum", "log_every", "max_steps"):
        _positive(f"trainer.{name}", getattr(tr, name))
    _positive("trainer.save_every", tr.save_every, allow_zero=True)
    _positive("trainer.keep_last", tr.keep_last)

    ev = cfg.eval
    _positive("eval.every", ev.every, allow_zero=True)
    _positive("eval.max_batches", ev.max_batches)
    if ev.every and ev.data is None:
        raise ConfigError("eval.every is set but eval.data is not (a data section)")
    if ev.data is not None:
        _validate_data(ev.data, "eval.data")

    ds = cfg.deepspeed
    if ds.zero_stage is not None:
        _one_of("deepspeed.zero_stage", ds.zero_stage, ZERO_STAGES)
    p = cfg.resolved_deepspeed_json()
    if p is not None and not os.path.isfile(p):  # False, not OSError, for a name too long
        raise ConfigError(f"deepspeed.config {str(p)!r} does not exist")
    if ds.offload_param and ds.zero_stage is not None and ds.zero_stage != 3:
        raise ConfigError("deepspeed.offload_param needs deepspeed.zero_stage 3")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")


__all__ = [
    "CACHE_DTYPES",
    "ConfigError",
    "DataSection",
    "DeepSpeedSection",
    "EvalSection",
    "LoggingSection",
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
