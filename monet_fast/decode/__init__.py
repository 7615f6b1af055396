"""monet_fast.decode: batched latent-feedback decoding (`generate`) over the stock Qwen2.5-VL.

See `monet_fast.decode.engine` for the decoding rule of both latent layouts and the engine
design (C++/CUDA state machine, static KV cache, CUDA graphs on GPU).
"""

from monet_fast._lazy import lazy_exports

# Exports are imported on first use: `monet_fast.decode.cli` is imported to build the CLI parser
# (for every command), which must not pull transformers and the model through the engine.
_LAZY = {
    "GenerateOutput": "monet_fast.decode.engine",
    "LatentDecoder": "monet_fast.decode.engine",
    "generate": "monet_fast.decode.engine",
    "GraphUnsafeProcessorWarning": "monet_fast.decode.graph_safety",
    "LogitsProcessor": "monet_fast.decode.graph_safety",
    "collapse_latent_spans": "monet_fast.decode.text",
    "render_latent_text": "monet_fast.decode.text",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
__all__ = sorted(_LAZY)
