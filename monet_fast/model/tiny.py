"""A tiny Qwen2.5-VL or Qwen3-VL model, tokenizer and processor built in code, for offline tests.

Everything here is deterministic and needs no download: the tokenizer is a byte-level BPE
trained with the `tokenizers` library on a generated corpus (chat words plus the synthetic task's
vocabulary), with Qwen2.5's pre-tokenizer, special tokens and eos/pad choices, then Monet's five
tokens; the model is the stock `Qwen2_5_VLForConditionalGeneration` with small dimensions but the
7B's structure (mRoPE with the 1:3:3 section split, windowed vision tower with a merger,
untied LM head, spare embedding rows beyond the tokenizer's length). `real_geometry_config` /
`tiny_model(geometry="qwen2_5_vl_7b")` give the 7B's attention geometry (hidden 3584, heads of
128 and 80) at two layers with narrow MLPs, for real-shape tests and benchmarks;
`geometry="qwen3_vl_8b"` the same for Qwen3-VL-8B (hidden 4096, heads of 128 and 72, DeepStack).
`arch="qwen3_vl"` builds the stock `Qwen3VLForConditionalGeneration` instead (DeepStack, interleaved
mRoPE, patch 16), over the same tokenizer; what differs comes from its `monet_fast.model.arch`
adapter.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import random
from typing import Any

from .arch import DEFAULT_ARCH, get_arch
from .config import LatentConfig, apply_latent_config
from .processor import QWEN2_VL_CHAT_TEMPLATE, MonetProcessor
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
# Image budget in LLM tokens (4..64); in pixels it scales with the architecture's patch size
# (Qwen2.5-VL: 28 x 28 pixels per token, Qwen3-VL: 32 x 32).
TINY_MIN_TOKENS, TINY_MAX_TOKENS = 4, 64

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
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    monet_tokens: bool = True,
    arch: str = DEFAULT_ARCH,
) -> MonetProcessor:
    """A MonetProcessor over `tiny_tokenizer()` with `arch`'s image processor and chat template;
    images are budgeted to 4..64 LLM tokens unless min_pixels / max_pixels say otherwise."""
    adapter = get_arch(arch)
    token_px = (adapter.patch_size * adapter.merge_size) ** 2
    tokenizer = tiny_tokenizer(monet_tokens=monet_tokens)
    tokenizer.chat_template = adapter.chat_template
    return MonetProcessor(
        image_processor=adapter.image_processor(
            min_pixels=min_pixels if min_pixels is not None else token_px * TINY_MIN_TOKENS,
            max_pixels=max_pixels if max_pixels is not None else token_px * TINY_MAX_TOKENS,
        ),
        tokenizer=tokenizer,
        chat_template=adapter.chat_template,
        model_type=adapter.model_type,
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tiny_config(
    vocab_size: int | None = None,
    tokenizer: Any = None,
    arch: str = DEFAULT_ARCH,
    **overrides: Any,
) -> Any:
    """A small config of `arch` (default `Qwen2_5_VLConfig`) whose special-token ids match
    `tiny_tokenizer()`; the architecture's own fields come from its adapter.

    `vocab_size` defaults to len(tokenizer) rounded up to a multiple of 64, leaving spare rows
    as the real 152,064-row table does. `overrides` are text-config fields (e.g.
    `hidden_size=128, num_hidden_layers=4`), top-level fields (e.g. `tie_word_embeddings`), or
    `text_config=` / `vision_config=` dicts merged into the defaults.
    """
    adapter = get_arch(arch)
    text_config_class = adapter.text_config_class()
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
        "pad_token_id": vocab[ENDOFTEXT],
        **adapter.tiny_text_defaults({"endoftext": vocab[ENDOFTEXT], "im_end": vocab[IM_END]}),
    }
    vision: dict[str, Any] = adapter.tiny_vision_defaults()
    top: dict[str, Any] = {
        "image_token_id": vocab[IMAGE_PAD],
        "video_token_id": vocab[VIDEO_PAD],
        "vision_start_token_id": vocab[VISION_START],
        "vision_end_token_id": vocab[VISION_END],
        "tie_word_embeddings": False,  # untied, like the 7B
    }
    # transformers 5.x configs are dataclasses; fall back to __init__'s parameters otherwise.
    text_fields = set(getattr(text_config_class, "__dataclass_fields__", ())) or set(
        inspect.signature(text_config_class.__init__).parameters
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
                f"unknown tiny_config override {key!r}; use a {adapter.display_name} text-config "
                f"field, one of {sorted(top)}, or text_config= / vision_config= dicts"
            )
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if "head_dim" in text_fields:
        text.setdefault("head_dim", head_dim)
    text.setdefault("rope_parameters", adapter.tiny_rope(head_dim))
    # The merger projects vision features straight into the LM's embedding space.
    vision.setdefault("out_hidden_size", text["hidden_size"])
    return adapter.config_class()(text_config=text, vision_config=vision, **top)


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
    # Qwen/Qwen3-VL-8B-Instruct config.json (as quoted in NVIDIA/TensorRT-LLM
    # tests/unittest/_torch/modeling/test_modeling_qwen3vl.py, QWEN3_VL_8B_CONFIG; the vision
    # values are also transformers' Qwen3VLVisionConfig defaults). Depth 36 text / 27 vision.
    "qwen3_vl_8b": {
        "arch": "qwen3_vl",
        "text_config": {
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,  # GQA group 4
            "head_dim": 128,  # explicit in the config (= 4096 / 32 here, not in the 4B)
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [24, 20, 20],  # of 64 frequencies, interleaved t, h, w
                "mrope_interleaved": True,
            },
        },
        "vision_config": {
            "hidden_size": 1152,
            "num_heads": 16,  # head_dim 72 (not a power of two)
            "out_hidden_size": 4096,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 2304,  # a 48 x 48 grid of learned ViT positions
        },
        # DeepStack: vision blocks [8, 16, 24] of 27 feed decoder layers 0, 1, 2 (of 36), each
        # through its own merger (4608 -> 4608 -> 4096). `real_geometry_config` keeps as many
        # levels as the reduced depths allow, from the first vision block.
        "deepstack_levels": 3,
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
    """A config of the geometry's architecture (`Qwen2_5_VLConfig`, `Qwen3VLConfig`) with a
    released model's attention geometry (`GEOMETRIES`) but `layers` text layers, `vision_depth`
    vision blocks and narrow MLPs, over `tiny_tokenizer()`.

    The vision tower keeps the real block pattern: for Qwen2.5-VL windowed blocks, with full
    attention in the last block of every group of 8 and in the last block (depth 2 -> [1]); for
    Qwen3-VL min(3, vision_depth, layers - 1) DeepStack levels (at least one) from blocks 0, 1,
    ... (2 layers -> [0]), each with the real merger shape. `overrides` are as for `tiny_config`
    (text_config= / vision_config= dicts are merged over the geometry).
    """
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {sorted(GEOMETRIES)}, got {geometry!r}")
    for name, value in (("layers", layers), ("vision_depth", vision_depth)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    geo = copy.deepcopy(GEOMETRIES[geometry])  # configs may normalise nested dicts in place
    pattern: dict[str, Any] = {}
    if "full_attention_every" in geo:
        every = geo["full_attention_every"]
        pattern["fullatt_block_indexes"] = sorted(
            {i for i in range(vision_depth) if i % every == every - 1} | {vision_depth - 1}
        )
    if "deepstack_levels" in geo:
        # Level i is added after decoder layer i. As in the 8B, a later layer must follow it:
        # one added after the last layer only changes the image tokens' own logits (no loss).
        levels = max(1, min(geo["deepstack_levels"], vision_depth, layers - 1))
        pattern["deepstack_visual_indexes"] = list(range(levels))
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
        **pattern,
        **overrides.pop("vision_config", {}),
    }
    return tiny_config(
        tokenizer=tokenizer,
        arch=geometry_arch(geometry),
        text_config=text,
        vision_config=vision,
        **overrides,
    )


def geometry_arch(geometry: str) -> str:
    """The architecture (`monet_fast.model.arch` model type) of a `GEOMETRIES` entry."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {sorted(GEOMETRIES)}, got {geometry!r}")
    return GEOMETRIES[geometry].get("arch", DEFAULT_ARCH)


def tiny_model(
    seed: int = 0,
    *,
    latent_size: int = 8,
    latent_layout: str = "sft",
    geometry: str | None = None,
    arch: str | None = None,
    **config_overrides: Any,
) -> tuple[Any, MonetProcessor]:
    """(model, processor): a seeded fp32 tiny `Qwen2_5_VLForConditionalGeneration` in eval mode,
    or the stock class of `arch` (a `monet_fast.model.arch` model_type, e.g. "qwen3_vl").

    The same seed gives identical weights; the global torch RNG is left untouched. Monet's tokens
    are in the tokenizer (inside the spare embedding rows, no resize) and the latent config
    (`latent_size`, `latent_layout`, token ids) is on `model.config`. `geometry` (a key of
    `GEOMETRIES`, e.g. "qwen2_5_vl_7b", "qwen3_vl_8b") builds the config with
    `real_geometry_config` instead of `tiny_config`, and implies its architecture (`arch`, when
    given, must match); `config_overrides` go to whichever builds it.
    """
    import torch

    if geometry is not None:
        implied = geometry_arch(geometry)
        if arch is not None and arch != implied:
            raise ValueError(
                f"geometry {geometry!r} is a {implied!r} model, got arch={arch!r}; "
                "leave arch unset or pass the matching one"
            )
        arch = implied
    arch = arch if arch is not None else DEFAULT_ARCH
    adapter = get_arch(arch)
    processor = tiny_processor(arch=arch)
    if geometry is None:
        config = tiny_config(tokenizer=processor.tokenizer, arch=arch, **config_overrides)
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
        model = adapter.model_class()(config)
    # Qwen3-VL's text config has no eos field; its checkpoints carry eos and pad in
    # generation_config.json, as set here (Qwen2.5-VL gets the same values from its config).
    gen = model.generation_config
    if gen.eos_token_id is None:
        gen.eos_token_id = processor.tokenizer.convert_tokens_to_ids(IM_END)
    if gen.pad_token_id is None:
        gen.pad_token_id = processor.tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    model = model.to(torch.float32).eval()
    return model, processor
