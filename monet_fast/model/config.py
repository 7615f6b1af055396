"""The latent settings of a Monet model, stored as plain fields of the HF model config.

Monet's latent behaviour is described by a few numbers: how many latent steps K follow a
`<abs_vis_token>` (`latent_size`), which layout the latent block uses (`latent_layout`, see
DESIGN.md: `sft` keeps the start token's embedding and fills K slots after it; `monet_vllm`
overwrites the start token's own row too, as the released Monet-7B was RL-trained and evaluated),
and the ids of the three latent tokens. The reference sets `latent_token_id`, `latent_start_id` and
`latent_end_id` on the model config at run time; we store the same names plus `latent_size` and
`latent_layout`, so they land in `config.json` with the weights. Plain transformers ignores the
extra fields, and a config without them (e.g. stock Qwen2.5-VL-7B) reads back as the defaults.
K is a saved config field and never an environment variable (the reference's RL code silently
falls back to token-only log-probs when its env vars are unset; REFERENCE.md §0.7).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .tokens import LATENT_END, LATENT_PAD, LATENT_START

LATENT_LAYOUTS: tuple[str, ...] = ("sft", "monet_vllm")

# Field names as they appear in config.json (the reference's names for the three ids).
_FIELDS: tuple[str, ...] = (
    "latent_size",
    "latent_layout",
    "latent_token_id",
    "latent_start_id",
    "latent_end_id",
    "feedback_norm",
)

# How a fed-back hidden state is rescaled before reuse (`monet_fast.model.feedback` applies it).
FEEDBACK_NORMS: tuple[str, ...] = ("none", "match_embeddings")


def check_feedback_norm(value: Any, where: str = "feedback_norm") -> str:
    """`value` if it names a feedback normalisation, else a ValueError naming the allowed ones."""
    if value not in FEEDBACK_NORMS:
        raise ValueError(f"{where} must be one of {list(FEEDBACK_NORMS)}, got {value!r}")
    return value


@dataclass(frozen=True)
class LatentConfig:
    """Latent settings of a Monet model.

    Attributes:
        latent_size: K, latent steps per latent block (SFT: 8; released Monet-7B decoding: 10).
        latent_layout: "sft" or "monet_vllm" (see the module docstring).
        latent_token_id: id of `<abs_vis_token_pad>` (latent slot), None if unknown.
        latent_start_id: id of `<abs_vis_token>`, None if unknown.
        latent_end_id: id of `</abs_vis_token>`, None if unknown.
        feedback_norm: "none" or "match_embeddings": how a fed-back hidden state is rescaled
            before it is reused as an input embedding (`monet_fast.model.feedback`).
    """

    latent_size: int = 8
    latent_layout: str = "sft"
    latent_token_id: int | None = None
    latent_start_id: int | None = None
    latent_end_id: int | None = None
    feedback_norm: str = "none"

    def __post_init__(self) -> None:
        # bool is an int subclass; True as a latent size is a bug, not K=1.
        if not isinstance(self.latent_size, int) or isinstance(self.latent_size, bool):
            raise ValueError(f"latent_size must be an int >= 1, got {self.latent_size!r}")
        if self.latent_size < 1:
            raise ValueError(f"latent_size must be an int >= 1, got {self.latent_size!r}")
        if self.latent_layout not in LATENT_LAYOUTS:
            raise ValueError(
                f"latent_layout must be one of {list(LATENT_LAYOUTS)}, got {self.latent_layout!r}"
            )
        check_feedback_norm(self.feedback_norm)
        for name in ("latent_token_id", "latent_start_id", "latent_end_id"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, latent_size: int = 8, latent_layout: str = "sft"
    ) -> LatentConfig:
        """Build a config whose token ids are looked up in `tokenizer` (Monet tokens must exist)."""
        vocab = tokenizer.get_vocab()
        missing = [tok for tok in (LATENT_PAD, LATENT_START, LATENT_END) if tok not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer lacks latent tokens {missing}; call "
                "monet_fast.model.tokens.add_monet_tokens(tokenizer) first"
            )
        return cls(
            latent_size=latent_size,
            latent_layout=latent_layout,
            latent_token_id=vocab[LATENT_PAD],
            latent_start_id=vocab[LATENT_START],
            latent_end_id=vocab[LATENT_END],
        )

    def replace(self, **changes: Any) -> LatentConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}


def _hf_config(model_or_config: Any) -> Any:
    # A PreTrainedModel carries its PretrainedConfig in `.config`; a config has no `.config`.
    return getattr(model_or_config, "config", model_or_config)


def apply_latent_config(model_or_config: Any, latent_cfg: LatentConfig) -> Any:
    """Store `latent_cfg`'s fields as attributes of the HF config; returns that config.

    The fields go on the top-level (Qwen2_5_VLConfig) config, where the reference puts its
    latent ids, so `save_pretrained` writes them to config.json and `from_pretrained` restores
    them.
    """
    if not isinstance(latent_cfg, LatentConfig):
        raise TypeError(f"latent_cfg must be a LatentConfig, got {type(latent_cfg).__name__}")
    config = _hf_config(model_or_config)
    for name, value in latent_cfg.to_dict().items():
        setattr(config, name, value)
    return config


def get_latent_config(model_or_config: Any) -> LatentConfig:
    """Read the latent fields back from an HF config (or model); defaults for absent fields.

    Raises ValueError if a stored value is invalid (e.g. a hand-edited config.json).
    """
    config = _hf_config(model_or_config)
    defaults = LatentConfig()
    values = {name: getattr(config, name, getattr(defaults, name)) for name in _FIELDS}
    # A config.json edited by hand or saved as None still means "use the default".
    for name in ("latent_size", "latent_layout", "feedback_norm"):
        if values[name] is None:
            values[name] = getattr(defaults, name)
    return LatentConfig(**values)
