"""QLoRA's loading step: the bitsandbytes quantization config for `model.quantize`.

Its own module so that loading (`load_pretrained(quantize=...)`), LoRA (`model/lora.py`, which
saves through loading) and the config schema (which reads `QUANTIZE_MODES`) import it without
importing each other. Imports nothing heavy at module level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from monet_fast._optional import require

if TYPE_CHECKING:
    import torch

QUANTIZE_MODES: tuple[str, ...] = ("4bit", "8bit")


def quantization_config(mode: str, compute_dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for `model.quantize` (QLoRA: NF4, double quantisation).

    Raises ValueError for an unknown mode or without a CUDA GPU (bitsandbytes' kernels are CUDA
    only) before importing bitsandbytes, so the refusal does not need it installed.
    """
    import torch

    if mode not in QUANTIZE_MODES:
        raise ValueError(f"model.quantize must be one of {list(QUANTIZE_MODES)}, got {mode!r}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"model.quantize {mode} (QLoRA) needs a CUDA GPU: bitsandbytes' quantized layers "
            "run on CUDA only; on CPU train LoRA without quantize"
        )
    require("bitsandbytes", f"model.quantize {mode}")
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
