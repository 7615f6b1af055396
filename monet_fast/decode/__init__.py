"""monet_fast.decode: batched latent-feedback decoding (`generate`) over the stock Qwen2.5-VL.

See `monet_fast.decode.engine` for the decoding rule of both latent layouts and the engine
design (C++/CUDA state machine, static KV cache, CUDA graphs on GPU).
"""

from monet_fast.decode.engine import GenerateOutput, LatentDecoder, generate
from monet_fast.decode.text import collapse_latent_spans, render_latent_text

__all__ = [
    "GenerateOutput",
    "LatentDecoder",
    "collapse_latent_spans",
    "generate",
    "render_latent_text",
]
