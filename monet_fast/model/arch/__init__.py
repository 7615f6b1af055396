"""One adapter per base model (`base.ArchAdapter`), registered by HF `model_type`.

`get_arch("qwen3_vl")`, `arch_of(model)`; `supported()` lists what is registered.
"""

from monet_fast.model.arch import qwen2_5_vl, qwen3_vl  # noqa: F401  (register the adapters)
from monet_fast.model.arch.base import (
    DEFAULT_ARCH,
    ArchAdapter,
    DeepstackFeatures,
    VisualInputs,
    arch_of,
    get_arch,
    register,
    supported,
)

__all__ = [
    "DEFAULT_ARCH",
    "ArchAdapter",
    "DeepstackFeatures",
    "VisualInputs",
    "arch_of",
    "get_arch",
    "register",
    "supported",
]
