"""Monet's special tokens: exact strings of the reference, added idempotently.

The strings and their insertion order must match the reference (NOVAglow646/Monet) so that
checkpoints stay compatible: on the stock Qwen2.5 tokenizer (151,665 entries) they receive the ids
151665..151669, which fall in the spare rows of the 152,064-row Qwen2.5-VL embedding table.
"""

from __future__ import annotations

from dataclasses import dataclass

LATENT_PAD = "<abs_vis_token_pad>"
LATENT_START = "<abs_vis_token>"
LATENT_END = "</abs_vis_token>"
OBS_START = "<observation>"
OBS_END = "</observation>"

# Insertion order of the reference (src/main.py); it decides the ids.
MONET_TOKENS: tuple[str, ...] = (LATENT_PAD, LATENT_START, LATENT_END, OBS_START, OBS_END)

# Stock Qwen2.5-VL tokens the layout code relies on.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
)

# The placeholder the reference data uses in assistant text right before an auxiliary image.
LATENT_PLACEHOLDER = LATENT_START + LATENT_END


@dataclass(frozen=True)
class TokenIds:
    """Ids of every token the sequence layout, losses and decoder look up."""

    latent_pad: int
    latent_start: int
    latent_end: int
    obs_start: int
    obs_end: int
    im_start: int
    im_end: int
    endoftext: int
    vision_start: int
    vision_end: int
    image_pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenIds":
        """Look every id up; raises if the tokenizer lacks one (call add_monet_tokens first)."""
        names = {
            "latent_pad": LATENT_PAD,
            "latent_start": LATENT_START,
            "latent_end": LATENT_END,
            "obs_start": OBS_START,
            "obs_end": OBS_END,
            "im_start": IM_START,
            "im_end": IM_END,
            "endoftext": ENDOFTEXT,
            "vision_start": VISION_START,
            "vision_end": VISION_END,
            "image_pad": IMAGE_PAD,
        }
        vocab = tokenizer.get_vocab()
        missing = [tok for tok in names.values() if tok not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer lacks special tokens {missing}; call "
                "monet_fast.model.tokens.add_monet_tokens(tokenizer) for Monet's tokens"
            )
        return cls(**{field: vocab[tok] for field, tok in names.items()})


def add_monet_tokens(tokenizer) -> list[int]:
    """Add Monet's five special tokens in the reference order; a no-op for tokens already there.

    Returns the ids of the five tokens in `MONET_TOKENS` order.
    """
    vocab = tokenizer.get_vocab()
    for tok in MONET_TOKENS:
        if tok not in vocab:
            tokenizer.add_tokens([tok], special_tokens=True)
            vocab = tokenizer.get_vocab()
    return [vocab[tok] for tok in MONET_TOKENS]


def ensure_embedding_rows(model, tokenizer) -> bool:
    """Make the model's embedding table (and an untied LM head) hold every tokenizer id.

    A real Qwen2.5-VL table has 152,064 rows, more than the 151,670 ids, so nothing happens
    there (as in the reference). A table that is too small is grown: new rows are initialised
    to the mean of the existing rows (HF's `mean_resizing`, which keeps the initial logits of new
    tokens close to the average token). The table is never shrunk. Returns True if it grew.
    """
    needed = len(tokenizer)
    current = model.get_input_embeddings().weight.shape[0]
    if needed <= current:
        return False
    model.resize_token_embeddings(needed, mean_resizing=True)
    return True
