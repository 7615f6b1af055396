"""A tiny Qwen2.5-VL model, tokenizer and processor built in code, for offline tests and the demo.

Everything here is deterministic and needs no download: the tokenizer is a byte-level BPE
trained with the `tokenizers` library on a generated corpus (chat words plus the synthetic task's
vocabulary), with Qwen2.5's pre-tokenizer, special tokens and eos/pad choices, then Monet's five
tokens; the model is the stock `Qwen2_5_VLForConditionalGeneration` with small dimensions but the
7B's structure (mRoPE with the 1:3:3 section split, windowed vision tower with a merger,
untied LM head, spare embedding rows beyond the tokenizer's length). `real_geometry_config` /
`tiny_model(geometry="qwen2_5_vl_7b")` give the 7B's attention geometry (hidden 3584, heads of
128 and 80) at two layers with narrow MLPs, for real-shape tests and benchmarks.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import random
from typing import Any

from .config import LatentConfig, apply_latent_config
from .processor import QWEN2_VL_CHAT_TEMPLATE, MonetProcessor, qwen_image_processor
from .tokens import (
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    QWEN_SPECIAL_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    add_monet_tokens,
)

# Qwen2.5's pre-tokenizer split (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX): letters with
# one leading non-letter, single digits, punctuation runs, newlines, spaces.
_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# BPE vocabulary size including the 256 byte symbols; special tokens come on top.
TINY_BPE_VOCAB = 1000
# The real table (152,064) is padded past the tokenizer (151,670); we round up to this multiple.
VOCAB_MULTIPLE = 64
TINY_MIN_PIXELS = 28 * 28 * 4
TINY_MAX_PIXELS = 28 * 28 * 64

_CHAT_WORDS = (
    "you are a an the helpful assistant user system is are was be can could would should will "
    "what which where who how many much why when there here this that these those it its of in "
    "on at to from by with for and or but not no yes if then so because let me us we i my our "
    "first second third next finally step think look see seen shows show find found check "
    "please put your final answer within question image picture photo object objects region "
    "area part crop zoom zoomed into out closer detail details observation observe visible "
    "located position corner side edge left right top bottom upper lower center middle above "
    "below near far behind front between inside outside around count number total each every "
    "one two three four five six seven eight nine ten small large big tiny medium bright dark "
    "color colored shape shaped option options choose select correct letter same different "
    "only also more less most least than other another thing things describe description "
    "answering reasoning reason explain explanation carefully likely clearly appears appear "
    "seems contain contains containing include includes label labels text word words sign "
    "scene background foreground person people car tree house table chair window door road "
    "sky water grass building animal dog cat bird book cup bottle phone screen chart graph "
    "line lines point points row column grid map size sizes larger smaller largest smallest "
    "closest farthest highest lowest inner outer horizontal vertical diagonal pattern patterns "
    "dot dots stripe stripes border outline filled empty solid round sharp thin thick long "
    "short wide narrow tall distance angle degrees value values result results correctly "
    "sure certain unclear unknown none all some any both either neither after before during "
    "while until again still just very quite really now time times visual latent thought "
    "thoughts reasoning zooming cropping marked highlight highlighted".split()
)
_COLORS = "red green blue yellow orange purple pink brown black white gray cyan magenta".split()
_SHAPES = "circle square triangle rectangle star diamond hexagon ellipse cross".split()
_SIZES = ("small", "large", "tiny", "big", "medium")
_POSITIONS = (
    "top left",
    "top right",
    "bottom left",
    "bottom right",
    "center",
    "upper half",
    "lower half",
)


def _corpus() -> list[str]:
    """A deterministic training corpus that looks like the chats the tests and demo produce."""
    rng = random.Random(0)
    lines: list[str] = []
    for _ in range(1500):
        color, shape, size = rng.choice(_COLORS), rng.choice(_SHAPES), rng.choice(_SIZES)
        pos = rng.choice(_POSITIONS)
        letters = "ABCD"
        options = rng.sample(_COLORS, 4)
        answer = rng.choice(letters)
        lines.append("system\nYou are a helpful assistant.\n")
        lines.append(
            f"user\nWhat is the color of the {size} {shape} in the image?\n"
            f"Options:\n(A) {options[0]}\n(B) {options[1]}\n(C) {options[2]}\n(D) {options[3]}\n"
            "Put your final answer within \\boxed{}."
        )
        lines.append(
            f"assistant\nLet me zoom in on the {pos} of the image. I crop the region with "
            f"the {shape}.\nThe observation shows a {color} {shape}. "
            f"So the answer is \\boxed{{{answer}}}."
        )
        lines.append(f"Question: How many {color} objects are there? Answer: {rng.randint(0, 99)}")
        lines.append(" ".join(rng.choice(_CHAT_WORDS) for _ in range(rng.randint(6, 16))) + ".")
        lines.append(f"The {color} {shape} is at ({rng.randint(0, 999)}, {rng.randint(0, 999)}).")
    return lines


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> tuple[str, str]:
    """Train the BPE once per process; returns (vocab JSON, merges JSON) so callers copy it."""
    vocab, merges = _train_bpe()
    return json.dumps(vocab), json.dumps(merges)


def _train_bpe() -> tuple[dict[str, int], list[list[str]]]:
    # Uncached trainer (the determinism test calls it twice).
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(
        BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    # Same normalizer / pre-tokenizer as transformers' Qwen2Tokenizer, which rebuilds the
    # pipeline from vocab + merges when a tokenizer.json is loaded.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # No special tokens here: like Qwen2.5, they get ids after the BPE vocabulary.
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [list(m) if not isinstance(m, str) else m.split(" ") for m in model["merges"]]
    return dict(model["vocab"]), merges


def tiny_tokenizer(monet_tokens: bool = True) -> Any:
    """A fresh `Qwen2Tokenizer` over the tiny BPE (~1000 entries) plus Qwen's special tokens.

    Like Qwen2.5-VL: eos `<|im_end|>`, pad `<|endoftext|>`, no bos/unk, special tokens right
    after the BPE vocabulary in Qwen's order, and the Qwen2-VL chat template. Monet's tokens are
    added after those unless `monet_tokens=False` (a "stock" tokenizer, as shipped with
    Qwen2.5-VL-7B). Every call returns a new object, so callers may mutate it.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab_json, merges_json = _trained_bpe()
    vocab = json.loads(vocab_json)
    merges = [tuple(m) for m in json.loads(merges_json)]
    n = len(vocab)
    added = {
        n + i: AddedToken(tok, special=True, normalized=False)
        for i, tok in enumerate(QWEN_SPECIAL_TOKENS)
    }
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        added_tokens_decoder=added,
        model_max_length=32768,
    )
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    if monet_tokens:
        add_monet_tokens(tokenizer)
    return tokenizer


def tiny_processor(
    min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS, monet_tokens: bool = True
) -> MonetProcessor:
    """A MonetProcessor over `tiny_tokenizer()`; images are budgeted to 4..64 LLM tokens."""
    return MonetProcessor(
        image_processor=qwen_image_processor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tiny_tokenizer(monet_tokens=monet_tokens),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _mrope_section(head_dim: int) -> list[int]:
    # Qwen2.5-VL-7B splits head_dim/2 = 64 rotary frequencies as [16, 24, 24] over (t, h, w);
    # keep the same 1:3:3 proportions.
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_config(vocab_size: int | None = None, tokenizer: Any = None, **overrides: Any) -> Any:
    """A small `Qwen2_5_VLConfig` whose special-token ids match `tiny_tokenizer()`.

    `vocab_size` defaults to len(tokenizer) rounded up to a multiple of 64, leaving spare rows
    as the real 152,064-row table does. `overrides` are text-config fields (e.g.
    `hidden_size=128, num_hidden_layers=4`), top-level fields (e.g. `tie_word_embeddings`), or
    `text_config=` / `vision_config=` dicts merged into the defaults.
    """
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    vocab = tok.get_vocab()
    if vocab_size is None:
        vocab_size = _round_up(len(tok), VOCAB_MULTIPLE)
    if vocab_size < len(tok):
        raise ValueError(f"vocab_size must be >= len(tokenizer) = {len(tok)}, got {vocab_size}")

    text: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "bos_token_id": vocab[ENDOFTEXT],
        "eos_token_id": vocab[IM_END],
        "pad_token_id": vocab[ENDOFTEXT],
    }
    vision: dict[str, Any] = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [0],
        "tokens_per_second": 2,
    }
    top: dict[str, Any] = {
        "image_token_id": vocab[IMAGE_PAD],
        "video_token_id": vocab[VIDEO_PAD],
        "vision_start_token_id": vocab[VISION_START],
        "vision_end_token_id": vocab[VISION_END],
        "tie_word_embeddings": False,  # untied, like the 7B
    }
    # transformers 5.x configs are dataclasses; fall back to __init__'s parameters otherwise.
    text_fields = set(getattr(Qwen2_5_VLTextConfig, "__dataclass_fields__", ())) or set(
        inspect.signature(Qwen2_5_VLTextConfig.__init__).parameters
    )
    for key, value in overrides.items():
        if key == "text_config":
            text.update(value)
        elif key == "vision_config":
            vision.update(value)
        elif key in top:
            top[key] = value
        elif key in text_fields:
            text[key] = value
        else:
            raise ValueError(
                f"unknown tiny_config override {key!r}; use a Qwen2.5-VL text-config field, "
                f"one of {sorted(top)}, or text_config= / vision_config= dicts"
            )
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text.setdefault(
        "rope_parameters",
        {"rope_type": "default", "rope_theta": 1e4, "mrope_section": _mrope_section(head_dim)},
    )
    # The merger projects vision features straight into the LM's embedding space.
    vision.setdefault("out_hidden_size", text["hidden_size"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top)


# The shapes of released checkpoints that decide attention, RoPE and vision-tower tensor layouts
# (values from their config.json). Depth and MLP widths are left to `real_geometry_config`'s
# caller, so that CPU tests can run a model with the real head geometry at two layers.
GEOMETRIES: dict[str, dict[str, Any]] = {
    "qwen2_5_vl_7b": {
        "text_config": {
            "hidden_size": 3584,
            "num_attention_heads": 28,  # head_dim 128
            "num_key_value_heads": 4,  # GQA group 7
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [16, 24, 24],
            },
        },
        "vision_config": {
            "hidden_size": 1280,
            "num_heads": 16,  # head_dim 80 (not a power of two)
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,  # windows of 4 x 4 merged patches
            "tokens_per_second": 2,
        },
        # The 7B (depth 32) runs full attention in the last block of every 8: [7, 15, 23, 31].
        "full_attention_every": 8,
    },
}


def real_geometry_config(
    geometry: str = "qwen2_5_vl_7b",
    *,
    layers: int = 2,
    intermediate_size: int = 256,
    vision_depth: int = 2,
    vision_intermediate_size: int = 256,
    tokenizer: Any = None,
    **overrides: Any,
) -> Any:
    """A `Qwen2_5_VLConfig` with a released model's attention geometry (`GEOMETRIES`) but
    `layers` text layers, `vision_depth` vision blocks and narrow MLPs, over `tiny_tokenizer()`.

    The vision tower keeps the real block pattern: windowed blocks, with full attention in the
    last block of every group of 8 and in the last block (depth 2 -> [1]). `overrides` are as
    for `tiny_config` (text_config= / vision_config= dicts are merged over the geometry).
    """
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {sorted(GEOMETRIES)}, got {geometry!r}")
    for name, value in (("layers", layers), ("vision_depth", vision_depth)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    geo = copy.deepcopy(GEOMETRIES[geometry])  # configs may normalise nested dicts in place
    every = geo["full_attention_every"]
    full = sorted({i for i in range(vision_depth) if i % every == every - 1} | {vision_depth - 1})
    text = {
        **geo["text_config"],
        "num_hidden_layers": layers,
        "intermediate_size": intermediate_size,
        **overrides.pop("text_config", {}),
    }
    vision = {
        **geo["vision_config"],
        "depth": vision_depth,
        "intermediate_size": vision_intermediate_size,
        "fullatt_block_indexes": full,
        **overrides.pop("vision_config", {}),
    }
    return tiny_config(tokenizer=tokenizer, text_config=text, vision_config=vision, **overrides)


def tiny_model(
    seed: int = 0,
    *,
    latent_size: int = 8,
    latent_layout: str = "sft",
    geometry: str | None = None,
    **config_overrides: Any,
) -> tuple[Any, MonetProcessor]:
    """(model, processor): a seeded fp32 tiny `Qwen2_5_VLForConditionalGeneration` in eval mode.

    The same seed gives identical weights; the global torch RNG is left untouched. Monet's tokens
    are in the tokenizer (inside the spare embedding rows, no resize) and the latent config
    (`latent_size`, `latent_layout`, token ids) is on `model.config`. `geometry` (a key of
    `GEOMETRIES`, e.g. "qwen2_5_vl_7b") builds the config with `real_geometry_config` instead of
    `tiny_config`; `config_overrides` go to whichever builds it.
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = tiny_processor()
    if geometry is None:
        config = tiny_config(tokenizer=processor.tokenizer, **config_overrides)
    else:
        config = real_geometry_config(geometry, tokenizer=processor.tokenizer, **config_overrides)
    apply_latent_config(
        config,
        LatentConfig.from_tokenizer(
            processor.tokenizer, latent_size=latent_size, latent_layout=latent_layout
        ),
    )
    # fork_rng: seeding must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model = model.to(torch.float32).eval()
    return model, processor
