"""The settings of one `generate()` call: `DecodeConfig` and `resolve_config`, which validates
the arguments up front and fills defaults from the model's saved latent config and generation
config. Its own module so that the engine, the host side (`host.py`), the Python step loop and
the server import it without importing each other."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from monet_fast.model.config import LATENT_LAYOUTS, LatentConfig, get_latent_config

# max_blocks meaning "no cap on latent blocks" (an int32 on the device).
NO_BLOCK_CAP = 2**31 - 1
DEFAULT_CHECK_EVERY = 8


@dataclass(frozen=True)
class DecodeConfig:
    """The resolved, validated settings of one generate() call."""

    max_new_tokens: int
    latent_size: int
    layout: str
    start_id: int
    end_id: int
    slot_id: int
    fill_id: int
    eos_ids: tuple[int, ...]
    max_blocks: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int | None
    return_latents: bool
    stop_strings: tuple[str, ...]
    check_every: int
    use_cuda_graphs: bool


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def saved_latent_config(model, processor) -> LatentConfig:
    """The model's saved latent config, its token ids taken from the tokenizer when unset."""
    saved = get_latent_config(model)
    if (
        saved.latent_start_id is None
        or saved.latent_end_id is None
        or saved.latent_token_id is None
    ):
        saved = LatentConfig.from_tokenizer(
            processor.tokenizer, latent_size=saved.latent_size, latent_layout=saved.latent_layout
        )
    return saved


def resolve_config(
    model,
    processor,
    *,
    max_new_tokens: int,
    latent_size: int | None = None,
    latent_layout: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    return_latents: bool = False,
    max_latent_blocks: int | None = None,
    stop_strings: Sequence[str] | str | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    check_every: int = DEFAULT_CHECK_EVERY,
    use_cuda_graphs: bool = True,
) -> DecodeConfig:
    """Validate the generate() arguments up front and fill defaults from the model config."""
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    saved = saved_latent_config(model, processor)
    k = saved.latent_size if latent_size is None else latent_size
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"latent_size must be an int >= 1, got {latent_size!r}")
    layout = saved.latent_layout if latent_layout is None else latent_layout
    if layout not in LATENT_LAYOUTS:
        raise ValueError(f"latent_layout must be one of {list(LATENT_LAYOUTS)}, got {layout!r}")
    if max_latent_blocks is None:
        max_blocks = NO_BLOCK_CAP
    elif isinstance(max_latent_blocks, int) and max_latent_blocks >= 0:
        max_blocks = max_latent_blocks
    else:
        raise ValueError(
            f"max_latent_blocks must be None or an int >= 0, got {max_latent_blocks!r}"
        )
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stops = tuple(stop_strings or ())
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop_strings must be non-empty strings, got {stops!r}")

    tokenizer = processor.tokenizer
    gen_cfg = getattr(model, "generation_config", None)
    eos = _as_id_list(eos_token_id)
    if not eos:
        eos = _as_id_list(getattr(gen_cfg, "eos_token_id", None)) or _as_id_list(
            tokenizer.eos_token_id
        )
    if not eos:
        raise ValueError(
            "no EOS token id: pass eos_token_id= or set generation_config.eos_token_id"
        )
    pad = getattr(gen_cfg, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return DecodeConfig(
        max_new_tokens=max_new_tokens,
        latent_size=k,
        layout=layout,
        start_id=saved.latent_start_id,
        end_id=saved.latent_end_id,
        slot_id=saved.latent_token_id,
        fill_id=int(pad),
        eos_ids=tuple(eos),
        max_blocks=max_blocks,
        do_sample=bool(do_sample),
        temperature=float(temperature),
        top_p=float(top_p),
        seed=seed,
        return_latents=bool(return_latents),
        stop_strings=stops,
        check_every=check_every,
        use_cuda_graphs=bool(use_cuda_graphs),
    )
