"""LoRA / QLoRA through `peft`: wrap a Qwen-VL model, unwrap it, merge it for export.

`add_lora` injects adapters into the model *in place* and returns the `PeftModel` wrapper; the
wrapped model itself (`unwrap(peft_model)`) keeps every attribute path the latent code reads
(`model.model.language_model`, `model.lm_head`), and its Linear layers now carry the adapters.
So the latent forward and the decoder take either object: they call `unwrap` first.

`export_merged` writes a plain Hugging Face checkpoint (base weights + B·A·alpha/r, no peft
keys: stock transformers loads it) and, beside it, the adapters alone (`PeftModel.save_pretrained`).
`adapters_disabled` runs the base model without its adapters: VLPO's KL reference, with no
second copy of the weights. QLoRA's loading step is `monet_fast.model.quantize`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monet_fast._optional import require
from monet_fast.model.unwrap import unwrap

if TYPE_CHECKING:  # torch is imported where used: the config module reads the constants below
    import torch

# The decoder projections (attention + MLP; same names in Qwen2.5-VL and Qwen3-VL): the usual
# LoRA target set.
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
# The vision tower's module names (its MLP reuses gate_proj/up_proj/down_proj): excluded from
# the adapters while it is frozen (peft matches a string pattern against the full module name).
VISION_EXCLUDE = r"(.*\.)?visual(\..*)?"
ADAPTER_NAME = "default"


def add_lora(
    model: Any,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | tuple[str, ...] = DEFAULT_TARGET_MODULES,
    freeze_vision: bool = True,
    quantized: bool = False,
) -> Any:
    """Inject LoRA adapters into `model` (in place) and return the PeftModel wrapper.

    Only the adapters train (peft freezes every base weight). With `freeze_vision` the vision
    tower gets no adapters. `quantized`: the model was loaded through `quantization_config`;
    peft's k-bit preparation (fp32 norms, input grads) runs first.
    """
    peft = require("peft", "model.lora")
    if quantized:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        exclude_modules=VISION_EXCLUDE if freeze_vision else None,
        bias="none",
    )
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"model.lora.target_modules {list(target_modules)}: {err}") from err
    return wrapped


def lora_layers(model: Any) -> dict[str, Any]:
    """{module name: LoRA layer} of the (unwrapped) model."""
    peft = require("peft", "model.lora")
    return {
        name: m
        for name, m in unwrap(model).named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }


def merged_state_dict(model: Any, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict of the model with its active adapters merged, under plain HF names.

    Computed beside the training weights (base + delta per adapted layer, moved to `device` one
    layer at a time), so the model keeps training unchanged: no merge/unmerge round trip, whose
    bf16 rounding would drift the base weights.
    """
    import torch
    from peft.utils.integrations import dequantize_module_weight

    with torch.no_grad():
        return _merged(unwrap(model), dequantize_module_weight, device)


def _merged(base: Any, dequantize: Any, device: Any) -> dict[str, torch.Tensor]:
    layers = lora_layers(base)
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if any(key.startswith(name + ".") for name in layers):
            continue  # an adapted layer's base_layer / lora_A / lora_B: merged below
        out[key] = value.detach().to(device)
    for name, layer in layers.items():
        inner = layer.get_base_layer()
        weight = dequantize(inner).detach()
        dtype = inner.weight.dtype if inner.weight.is_floating_point() else weight.dtype
        merged = weight.float()
        if not layer.merged:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    merged = merged + layer.get_delta_weight(adapter).float()
        out[f"{name}.weight"] = merged.to(device, dtype)
        if getattr(inner, "bias", None) is not None:
            out[f"{name}.bias"] = inner.bias.detach().to(device)
    return out


def export_merged(
    model: Any,
    processor: Any,
    path: str | os.PathLike,
    adapter_path: str | os.PathLike | None = None,
) -> Path:
    """Write the merged model as a plain HF checkpoint at `path` (atomic, `save_pretrained`)
    and the adapters alone at `adapter_path` (peft's adapter_config.json + weights).

    Call on one rank; under ZeRO-3 gather the parameters around the call.
    """
    from .loading import save_pretrained

    state = merged_state_dict(model)
    target = save_pretrained(unwrap(model), processor, path, state_dict=state)
    if adapter_path is not None:
        peft = require("peft", "model.lora")
        if not isinstance(model, peft.PeftModel):
            raise TypeError("saving the adapters alone needs the PeftModel (from add_lora)")
        model.save_pretrained(str(adapter_path), save_embedding_layers=False)
    return target


@contextmanager
def adapters_disabled(model: Any) -> Iterator[Any]:
    """Run the base model without its adapters (and in eval mode) inside the block; yields the
    unwrapped model, whose forward then equals the model before LoRA."""
    base = unwrap(model)
    was_training = base.training
    base.eval()
    try:
        with model.disable_adapter():
            yield base
    finally:
        base.train(was_training)


__all__ = [
    "DEFAULT_TARGET_MODULES",
    "adapters_disabled",
    "add_lora",
    "export_merged",
    "lora_layers",
    "merged_state_dict",
]
