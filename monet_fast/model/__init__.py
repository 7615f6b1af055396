"""monet_fast.model: Monet tokens, latent config, processor, tiny model, checkpoint loading.

Importing this package is cheap: each name below is imported from its module on first use.
"""

from monet_fast._lazy import lazy_exports

# Exports are imported on first access (PEP 562) so that `import monet_fast.model.tokens` (the
# CLI parser, data, decode) costs neither transformers nor the Triton kernels, and so that
# `from monet_fast.model import tiny_model` works where Triton is not installed.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ["LATENT_LAYOUTS", "LatentConfig", "apply_latent_config", "get_latent_config"], "config"
    ),
    **dict.fromkeys(["ArchAdapter", "arch_of", "get_arch"], "arch"),
    **dict.fromkeys(["LatentForwardOutput", "latent_forward"], "latent"),
    **dict.fromkeys(["load_pretrained", "save_pretrained"], "loading"),
    **dict.fromkeys(["QWEN2_VL_CHAT_TEMPLATE", "MonetProcessor"], "processor"),
    **dict.fromkeys(["tiny_config", "tiny_model", "tiny_processor", "tiny_tokenizer"], "tiny"),
    **dict.fromkeys(
        [
            "ENDOFTEXT",
            "IM_END",
            "IM_START",
            "IMAGE_PAD",
            "LATENT_END",
            "LATENT_PAD",
            "LATENT_PLACEHOLDER",
            "LATENT_START",
            "MONET_TOKENS",
            "OBS_END",
            "OBS_START",
            "QWEN_SPECIAL_TOKENS",
            "VIDEO_PAD",
            "VISION_END",
            "VISION_START",
            "TokenIds",
            "add_monet_tokens",
            "ensure_embedding_rows",
        ],
        "tokens",
    ),
}


__getattr__, __dir__ = lazy_exports(
    __name__, {name: f"{__name__}.{module}" for name, module in _EXPORTS.items()}, globals()
)
__all__ = sorted(_EXPORTS)
