"""The config schema SFT and VLPO share: YAML -> overrides -> typed dataclasses -> validation.

Both recipes' configs (`monet_fast.train.config.TrainConfig`, `monet_fast.train.vlpo_config.
RLConfig`) are a `RunConfig`: the same `model`, `optim`, `scheduler`, `deepspeed`, `logging`
sections, a trainer section over `TrainerBasics` and a data section over `DataSection`. Those
shared sections are checked once, here (`validate_common`), so a value refused for SFT is refused
for RL too, at load time and with the same message. Unknown keys are errors everywhere, with a
"did you mean" suggestion. Each recipe adds its own sections and cross-section rules.

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
from typing import Any, TypeVar

import yaml

from monet_fast.data.validation import ON_ERROR_MODES
from monet_fast.model.feedback import FEEDBACK_NORMS
from monet_fast.model.lora import DEFAULT_TARGET_MODULES
from monet_fast.model.quantize import QUANTIZE_MODES

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")
DATA_KINDS: tuple[str, ...] = ("synthetic", "monet_sft")
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
    # The architecture that tiny model is built for (a `monet_fast.model.arch` model_type:
    # qwen2_5_vl | qwen3_vl); ignored when the model comes from init.
    tiny_arch: str = "qwen2_5_vl"
    latent_size: int = 8  # K latent slots per auxiliary image; exported in config.json
    # none | match_embeddings: rescale each fed-back latent to the mean input-embedding norm
    # (monet_fast.model.feedback); exported in config.json. None = keep the init model's.
    feedback_norm: str | None = None
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
class TrainerBasics:
    """The trainer fields both recipes have (SFT counts optimizer steps, VLPO counts RL steps)."""

    epochs: int = 1
    micro_batch_size: int = 1  # per rank per forward (SFT: samples, VLPO: sequences)
    max_steps: int | None = None  # stop after this step (schedule unchanged)
    log_every: int = 1
    save_every: int = 0  # steps between checkpoints; 0 = final checkpoint only
    keep_last: int = 2  # checkpoints kept on disk (older ones deleted after a save)
    shared_filesystem: bool = True  # false: each node keeps its own checkpoint copy (local disks)
    export: bool = True  # write a Hugging Face directory to <output>/hf at the end
    shuffle: bool = True  # reshuffle every epoch from (seed, epoch)


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
    """What the SFT and RL configs share: the plain dict, the YAML the run directory keeps, the
    DeepSpeed JSON path and the validation of the shared sections.

    Subclasses are dataclasses with at least the fields `model`, `optim`, `scheduler`,
    `trainer` (a `TrainerBasics`), `eval` (with `every`), `deepspeed`, `logging` and `source`;
    they implement `_validate_recipe` for their own sections.
    """

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out

    def dump(self) -> str:
        """The resolved config as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolved_deepspeed_json(self) -> Path | None:
        if self.deepspeed.config is None:
            return None
        p = Path(self.deepspeed.config)
        if not p.is_absolute() and self.source is not None:
            p = Path(self.source).parent / p
        return p

    def validate(self: C) -> C:
        """Raise ConfigError for every refused value or combination; returns self."""
        self._validate_first()
        validate_common(self)
        self._validate_recipe()
        return self

    def _validate_first(self) -> None:
        """Checks that must come before the shared ones (SFT: the stage)."""

    def _validate_recipe(self) -> None:
        raise NotImplementedError


C = TypeVar("C", bound=RunConfig)


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


def with_cli_flags(
    overrides: list[str] | None,
    *,
    output: str | Path | None = None,
    max_steps: int | None = None,
    init: str | Path | None = None,
) -> list[str]:
    """`overrides` plus the common command-line flags of `train` and `rl` as `key=value`
    strings, last so that they win over the file."""
    extra = list(overrides or [])
    if output is not None:
        extra.append(f"output={output}")
    if max_steps is not None:
        extra.append(f"trainer.max_steps={max_steps}")
    if init is not None:
        extra.append(f"model.init={init}")
    return extra


def build_run_config(
    cls: type[C],
    config: str | Path | RunConfig | None,
    overrides: list[str] | None,
    load: typing.Callable[[str | Path | None, list[str]], C],
    *,
    output: str | Path | None = None,
    max_steps: int | None = None,
    init: str | Path | None = None,
) -> C:
    """What `train` and `rl` run: a `cls` object as given (validated; it takes no overrides or
    flags), or `load(path, overrides + flags)` for a config file (None = defaults)."""
    extra = with_cli_flags(overrides, output=output, max_steps=max_steps, init=init)
    if isinstance(config, cls):
        if extra:
            raise ValueError(
                f"pass overrides with a config path, or edit the {cls.__name__} object"
            )
        return config.validate()
    return load(config, extra)


def config_from_mapping(cls: type[C], values: Any, source: str | None = None) -> C:
    """A `cls` from a plain mapping (not yet validated); `source` is the file it came from."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a YAML mapping, got {type(values).__name__}")
    cfg = _build(cls, values)
    cfg.source = source
    return cfg


def load_run_config(
    cls: type[C],
    path: str | Path | None,
    overrides: list[str] | None = None,
    adjust: typing.Callable[[dict, str | None], None] | None = None,
) -> C:
    """Read a YAML config, apply `key=value` overrides (then `adjust(values, source)`), build
    `cls` and validate it; a ConfigError names the file."""
    values, source = read_yaml_config(path)
    try:
        values = apply_overrides(values, list(overrides or []))
        if adjust is not None:
            adjust(values, source)
        return config_from_mapping(cls, values, source).validate()
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


def validate_model(m: ModelSection) -> None:
    _one_of("model.precision", m.precision, PRECISIONS)
    if m.latent_size < 1:
        raise ConfigError(f"model.latent_size must be >= 1, got {m.latent_size}")
    if m.feedback_norm is not None:
        _one_of("model.feedback_norm", m.feedback_norm, FEEDBACK_NORMS)
    from monet_fast.model.arch import supported  # the registered adapters

    _one_of("model.tiny_arch", m.tiny_arch, tuple(supported()))
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


def validate_optim(o: OptimSection) -> None:
    _one_of("optim.name", o.name, OPTIMIZERS)
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.eps", o.eps)
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    _positive("optim.momentum", o.momentum, allow_zero=True)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas!r}")


def validate_scheduler(s: SchedulerSection) -> None:
    _one_of("scheduler.name", s.name, SCHEDULERS)
    _positive("scheduler.warmup_steps", s.warmup_steps, allow_zero=True)
    _positive("scheduler.total_steps", s.total_steps)


def validate_trainer(t: TrainerBasics) -> None:
    for name in ("epochs", "micro_batch_size", "log_every", "max_steps"):
        _positive(f"trainer.{name}", getattr(t, name))
    _positive("trainer.save_every", t.save_every, allow_zero=True)
    _positive("trainer.keep_last", t.keep_last)


def validate_deepspeed(cfg: RunConfig) -> None:
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


def validate_common(cfg: RunConfig) -> None:
    """The shared sections, the same rules and messages for SFT and VLPO."""
    validate_model(cfg.model)
    validate_optim(cfg.optim)
    validate_scheduler(cfg.scheduler)
    validate_trainer(cfg.trainer)
    _positive("eval.every", cfg.eval.every, allow_zero=True)
    validate_deepspeed(cfg)


__all__ = [
    "DATA_KINDS",
    "ON_ERROR_MODES",
    "OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULERS",
    "ZERO_STAGES",
    "ConfigError",
    "DataSection",
    "DeepSpeedSection",
    "LoggingSection",
    "LoraSection",
    "ModelSection",
    "OptimSection",
    "RunConfig",
    "SchedulerSection",
    "TrainerBasics",
    "apply_overrides",
    "build_run_config",
    "config_from_mapping",
    "load_run_config",
    "read_yaml_config",
    "validate_adapters",
    "validate_common",
]
