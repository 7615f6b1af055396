"""monet_fast.model: Monet tokens, latent config, processor, tiny model, checkpoint loading.

Importing this package is cheap: the modules below import torch/transformers inside functions.
"""

from .config import LATENT_LAYOUTS, LatentConfig, apply_latent_config, get_latent_config
from .latent import LatentForwardOutput, latent_forward
from .loading import load_pretrained, save_pretrained
from .processor import QWEN2_VL_CHAT_TEMPLATE, MonetProcessor
from .tiny import tiny_config, tiny_model, tiny_processor, tiny_tokenizer
from .tokens import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE_PAD,
    LATENT_END,
    LATENT_PAD,
    LATENT_PLACEHOLDER,
    LATENT_START,
    MONET_TOKENS,
    OBS_END,
    OBS_START,
    QWEN_SPECIAL_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    TokenIds,
    add_monet_tokens,
    ensure_embedding_rows,
)

__all__ = [
    "ENDOFTEXT",
    "IMAGE_PAD",
    "IM_END",
    "IM_START",
    "LATENT_END",
    "LATENT_LAYOUTS",
    "LATENT_PAD",
    "LATENT_PLACEHOLDER",
    "LATENT_START",
    "MONET_TOKENS",
    "OBS_END",
    "OBS_START",
    "QWEN2_VL_CHAT_TEMPLATE",
    "QWEN_SPECIAL_TOKENS",
    "VIDEO_PAD",
    "VISION_END",
    "VISION_START",
    "LatentConfig",
    "LatentForwardOutput",
    "MonetProcessor",
    "TokenIds",
    "add_monet_tokens",
    "apply_latent_config",
    "ensure_embedding_rows",
    "get_latent_config",
    "latent_forward",
    "load_pretrained",
    "save_pretrained",
    "tiny_config",
    "tiny_model",
    "tiny_processor",
    "tiny_tokenizer",
]
