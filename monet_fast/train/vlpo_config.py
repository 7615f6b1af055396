"""VLPO configuration: the typed sections of `configs/*/vlpo.yaml`, their validation and
`load_rl_config`. The sections SFT shares (model, data basics, optim, scheduler, trainer basics,
deepspeed, logging) and their validation come from `monet_fast.train.config_schema`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from monet_fast.train.config_schema import (
    ON_ERROR_MODES,
    ConfigError,
    DataSection,
    DeepSpeedSection,
    LoggingSection,
    ModelSection,
    OptimSection,
    RunConfig,
    SchedulerSection,
    TrainerBasics,
    _one_of,
    _positive,
    _validate_data,
    load_run_config,
)
from monet_fast.train.rewards import FORMAT_RULES
from monet_fast.train.rollout import PAIRINGS

REF_MODES: tuple[str, ...] = ("copy", "offload", "zero3", "none")
KL_TYPES: tuple[str, ...] = ("low_var_kl",)

# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


RL_DATA_KINDS: tuple[str, ...] = ("synthetic", "monet_sft", "prompts")


@dataclass
class RLDataSection(DataSection):
    """Prompts to roll out: the SFT data kinds plus `prompts` (question + image(s) + answer).

    kind prompts: a .jsonl (one object per line) or .json list of {"question": str, "image":
    path or [paths] (relative to `root`), "answer": str, "choices": [str] (optional: multiple
    choice, answer = letter or option text), "id": str (optional), "system": str (optional)}.
    Only the question and the gold answer are used; a Monet-SFT sample's reasoning is ignored.
    """

    synthetic: dict = field(default_factory=dict)  # synthetic task options, e.g. {n_choices: 2}


@dataclass
class RolloutSection:
    """How responses are sampled (reference: vLLM, n=8, T=0.5, top-p 0.99)."""

    group_size: int = 8  # G responses per prompt
    prompts_per_step: int = 64  # prompts per RL step, all ranks together
    temperature: float = 0.5  # text tokens; latent steps are deterministic (the mean)
    top_p: float = 0.99
    max_new_tokens: int = 4096  # latent steps and forced tokens included
    batch_size: int = 64  # sequences per generate() call
    max_latent_blocks: int | None = None  # cap on latent blocks per response (None = no cap)
    prompt_suffix: str | None = None  # appended to the question text (reference: format prompt)
    cuda_graphs: bool = True  # decode with CUDA graphs (off automatically under ZeRO-3)
    # sft (our SFT layout) | monet_vllm (released Monet-7B: START's row overwritten, K = 10)
    latent_layout: str = "sft"


@dataclass
class ObjectiveSection:
    """The VLPO objective (reference: EasyR1 GRPO with latent Gaussian actions)."""

    sigma: float = 10.0  # latent policy scale: log p(z) = -||z - mu||^2 / (2 sigma^2)
    clip_low: float = 0.2
    clip_high: float = 0.3
    clip_ratio_dual: float = 3.0
    kl_coef: float = 0.01  # low_var_kl loss to the frozen reference model; 0 disables
    kl_type: str = "low_var_kl"
    latent_pairing: str = "correct"  # correct: mu at p-1 (what produced z) | reference: mu at p
    latent_term: bool = True  # false = token-only log-probs (what the released code runs)
    adv_eps: float = 1e-6
    # Token log-probs without [n_tokens, V] logits: rows per chunk of the chunked linear + CE
    # (monet_fast.model.chunked_ce); 0 = plain log-softmax over full-vocabulary logits.
    ce_chunk_size: int = 0


@dataclass
class FilterSection:
    """Online difficulty filter: keep prompt groups with acc_low < accuracy <= acc_high, pooled
    over up to 1 + max_extra_rollouts rollout calls until the step's prompt quota is met
    (`filtering.py`)."""

    enabled: bool = True
    acc_low: float = 0.0
    acc_high: float = 0.6
    min_groups: int = 1  # fewer kept groups (all ranks) -> the step is skipped
    max_extra_rollouts: int = 3  # extra rollout calls per step (reference: 256 / 64 -> 3)


@dataclass
class RewardFnSection:
    name: str = ""  # "package.module:function", fn(text, sample, info) -> float
    weight: float = 1.0


@dataclass
class JudgeSection:
    """Optional OpenAI-compatible judge for rule-wrong answers; off unless base_url is set."""

    base_url: str | None = None  # e.g. http://localhost:8000/v1
    model: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 30.0
    retries: int = 2


@dataclass
class RewardSection:
    correct_weight: float = 0.9
    format_weight: float = 0.1
    format_rule: str = "boxed"  # boxed (reference) | latent_boxed
    functions: list[RewardFnSection] = field(default_factory=list)
    judge: JudgeSection = field(default_factory=JudgeSection)


@dataclass
class RefSection:
    """The frozen reference model of the KL term."""

    mode: str = "copy"  # copy (on device) | offload (CPU, moved in per step) | zero3 | none
    model: str | None = None  # None = the init model
    offload_param: bool = False  # zero3: keep the partitions in CPU memory


@dataclass
class RLTrainerSection(TrainerBasics):
    """VLPO: steps are RL steps (rollout batches); max_steps None = epochs over the prompts."""

    micro_batch_size: int = 2  # sequences per forward per rank
    mini_batch_prompts: int = 16  # prompt groups per optimizer step (reference 16)


@dataclass
class RLEvalSection:
    every: int = 0  # RL steps between evaluations on held-out prompts; 0 = never
    at_start: bool = False  # also evaluate before the first step (logged as an event)
    data: RLDataSection | None = None
    samples_per_prompt: int = 1
    temperature: float = 0.0  # 0 = greedy (reference validation: T 0.1, n 1)
    max_new_tokens: int | None = None  # None = rollout.max_new_tokens


@dataclass
class RLConfig(RunConfig):
    """A whole VLPO run. `source` is the YAML file it came from (for relative paths)."""

    seed: int = 42
    output: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: RLDataSection = field(default_factory=RLDataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    vlpo: ObjectiveSection = field(default_factory=ObjectiveSection)
    filter: FilterSection = field(default_factory=FilterSection)
    reward: RewardSection = field(default_factory=RewardSection)
    ref: RefSection = field(default_factory=RefSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-6))
    scheduler: SchedulerSection = field(
        default_factory=lambda: SchedulerSection(name="constant", warmup_steps=0)
    )
    trainer: RLTrainerSection = field(default_factory=RLTrainerSection)
    eval: RLEvalSection = field(default_factory=RLEvalSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    source: str | None = None

    def _validate_recipe(self) -> None:
        _validate_rl(self)


def _validate_rl_data(d: RLDataSection, key: str) -> None:
    if d.kind == "prompts":
        if not d.path:
            raise ConfigError(f"{key}.kind is prompts but {key}.path is not set (a .jsonl/.json)")
        _one_of(f"{key}.on_error", d.on_error, ON_ERROR_MODES)
        _positive(f"{key}.limit", d.limit)
    else:
        _one_of(f"{key}.kind", d.kind, RL_DATA_KINDS)
        _validate_data(d, key)
    if d.synthetic and d.kind != "synthetic":
        raise ConfigError(f"{key}.synthetic options need {key}.kind synthetic")
    if d.synthetic:
        from monet_fast.data.synthetic import SyntheticTaskConfig

        try:
            SyntheticTaskConfig().with_options(**d.synthetic)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}.synthetic: {err}") from err


def _validate_rl(cfg: RLConfig) -> None:
    """What only VLPO has (the shared sections are checked by `validate_common`)."""
    m = cfg.model
    if (
        m.lora is not None
        and cfg.ref.mode != "none"
        and (cfg.ref.mode != "copy" or cfg.ref.model is not None)
    ):
        raise ConfigError(
            f"with model.lora the KL reference is the policy's base model with its adapters "
            f"disabled (no second copy): ref.mode must be 'copy' (the default) or 'none' and "
            f"ref.model unset, got ref.mode {cfg.ref.mode!r}, ref.model {cfg.ref.model!r}"
        )
    _validate_rl_data(cfg.data, "data")

    r = cfg.rollout
    for name in ("group_size", "prompts_per_step", "max_new_tokens", "batch_size"):
        _positive(f"rollout.{name}", getattr(r, name))
    _positive("rollout.temperature", r.temperature)
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {r.top_p!r}")
    _positive("rollout.max_latent_blocks", r.max_latent_blocks, allow_zero=True)
    from monet_fast.model.config import LATENT_LAYOUTS

    _one_of("rollout.latent_layout", r.latent_layout, LATENT_LAYOUTS)

    o = cfg.vlpo
    _positive("vlpo.sigma", o.sigma)
    if not 0 <= o.clip_low < 1:
        raise ConfigError(f"vlpo.clip_low must be in [0, 1), got {o.clip_low!r}")
    _positive("vlpo.clip_high", o.clip_high, allow_zero=True)
    if not o.clip_ratio_dual > 1:
        raise ConfigError(f"vlpo.clip_ratio_dual must be > 1, got {o.clip_ratio_dual!r}")
    _positive("vlpo.kl_coef", o.kl_coef, allow_zero=True)
    _one_of("vlpo.kl_type", o.kl_type, KL_TYPES)
    _one_of("vlpo.latent_pairing", o.latent_pairing, PAIRINGS)
    _positive("vlpo.adv_eps", o.adv_eps)
    _positive("vlpo.ce_chunk_size", o.ce_chunk_size, allow_zero=True)

    f = cfg.filter
    if not 0 <= f.acc_low < f.acc_high <= 1:
        raise ConfigError(
            f"filter band must satisfy 0 <= acc_low < acc_high <= 1, got ({f.acc_low}, "
            f"{f.acc_high}]"
        )
    _positive("filter.min_groups", f.min_groups)
    _positive("filter.max_extra_rollouts", f.max_extra_rollouts, allow_zero=True)

    rw = cfg.reward
    _one_of("reward.format_rule", rw.format_rule, FORMAT_RULES)
    for i, fn in enumerate(rw.functions):
        if ":" not in fn.name:
            raise ConfigError(
                f"reward.functions[{i}].name must be 'package.module:function', got {fn.name!r}"
            )
    j = rw.judge
    if j.base_url and not j.model:
        raise ConfigError("reward.judge.base_url is set but reward.judge.model is not")
    _positive("reward.judge.timeout", j.timeout)
    _positive("reward.judge.retries", j.retries, allow_zero=True)

    _one_of("ref.mode", cfg.ref.mode, REF_MODES)
    if cfg.ref.mode == "none" and o.kl_coef > 0:
        raise ConfigError(
            f"ref.mode none has no reference model but vlpo.kl_coef is {o.kl_coef}; set "
            "vlpo.kl_coef=0 or choose ref.mode copy | offload | zero3"
        )
    if cfg.ref.offload_param and cfg.ref.mode != "zero3":
        raise ConfigError("ref.offload_param needs ref.mode zero3")

    _positive("trainer.mini_batch_prompts", cfg.trainer.mini_batch_prompts)

    ev = cfg.eval
    _positive("eval.samples_per_prompt", ev.samples_per_prompt)
    _positive("eval.temperature", ev.temperature, allow_zero=True)
    _positive("eval.max_new_tokens", ev.max_new_tokens)
    if (ev.every or ev.at_start) and ev.data is None:
        raise ConfigError("eval.every / eval.at_start is set but eval.data is not")
    if ev.data is not None:
        _validate_rl_data(ev.data, "eval.data")


def load_rl_config(path: str | Path | None, overrides: list[str] | None = None) -> RLConfig:
    """Read a VLPO YAML config, apply `key=value` overrides, validate (ConfigError names the file)."""
    return load_run_config(RLConfig, path, overrides)
