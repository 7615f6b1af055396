"""The training recipes' LoRA glue: wrap the policy per `model.lora`, export merged + adapters.

The recipes keep `self.model` as the plain transformers model (its layers carry the adapters
after `wrap_policy`), so the latent forward, the decoder, DeepSpeed and the checkpoints see the
same module paths as in full fine-tuning; the PeftModel wrapper is kept beside it for saving the
adapters and for running the base without them (VLPO's KL reference).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monet_fast.train.config_schema import ModelSection

ADAPTER_DIR = "adapter"  # <output>/adapter: the adapters alone, beside the merged <output>/hf


def wrap_policy(model: Any, m: ModelSection) -> Any | None:
    """Add `m.lora` adapters to `model` in place; returns the PeftModel, or None without LoRA.

    Only the adapters then require grad (so only they reach the optimizer); with
    `m.freeze_vision` the vision tower has no adapters.
    """
    if m.lora is None:
        return None
    from monet_fast.model.lora import add_lora

    lo = m.lora
    return add_lora(
        model,
        r=lo.r,
        alpha=lo.alpha,
        dropout=lo.dropout,
        target_modules=lo.target_modules,
        freeze_vision=m.freeze_vision,
        quantized=m.quantize is not None,
    )


def export_lora(
    peft_model: Any,
    processor: Any,
    path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    *,
    zero_stage: int = 0,
    rank: int = 0,
    reload_base: Callable[[], Any] | None = None,
) -> Path:
    """`checkpoint.export_hf` for a LoRA policy: the merged model at `path` (plain HF, loads in
    stock transformers) and the adapters at `adapter_path`. Every rank calls it under ZeRO-3
    (parameters gathered); rank 0 writes.

    reload_base: QLoRA — a quantized base cannot be written as a plain checkpoint, so the
    adapters are saved, then applied to the full-precision base this returns (the init model)
    and merged there (the usual QLoRA merge).
    """
    from monet_fast.model.lora import export_merged

    if reload_base is not None:
        if rank == 0:
            merge_onto_base(peft_model, reload_base(), processor, path, adapter_path)
        return Path(path)
    if zero_stage == 3:
        from monet_fast._optional import require

        deepspeed = require("deepspeed", "saving a ZeRO-3 model")
        params = list(peft_model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                export_merged(peft_model, processor, path, adapter_path)
    elif rank == 0:
        export_merged(peft_model, processor, path, adapter_path)
    return Path(path)


def merge_onto_base(
    peft_model: Any,
    base: Any,
    processor: Any,
    path: str | os.PathLike,
    adapter_path: str | os.PathLike,
) -> Path:
    """Save the adapters of `peft_model` at `adapter_path`, load them onto `base` (an unadapted
    model of the same architecture) and write that merged model at `path`."""
    from monet_fast._optional import require
    from monet_fast.model.lora import export_merged

    peft = require("peft", "model.lora")
    peft_model.save_pretrained(str(adapter_path), save_embedding_layers=False)
    onto = peft.PeftModel.from_pretrained(base, str(adapter_path))
    return export_merged(onto, processor, path)


__all__ = ["ADAPTER_DIR", "export_lora", "merge_onto_base", "wrap_policy"]
