"""The latent-mask Triton attention as a transformers attention implementation, "monet_latent".

`use_latent_attention(model)` switches the language model of a Qwen2.5-VL (the vision tower
keeps its own attention) to it. The compact stage-2 mask travels as forward kwargs, which
transformers 5 passes unchanged from `Qwen2_5_VLForConditionalGeneration.forward` through the
decoder layers to the attention function:

    model(input_ids=..., attention_mask=..., masked_rows=mr, kv_lens=None, q_offset=None)

* masked_rows: int [B, >= Sk, 4] (`monet_fast.model.sequence`): the whole-sequence description
  may be passed for every chunk of a cached forward, only the first Sk key columns are read.
* kv_lens: int [B] valid keys per sample (right padding); optional, the 2-D attention_mask
  already covers padding.
* q_offset: absolute position of the first query; default Sk - Sq (a DynamicCache prefix).

Without masked_rows the attention is plain causal plus the 2-D padding mask, like "sdpa" (and
is "sdpa" when there is neither padding nor a cache prefix: its fused causal kernels are the
best choice there).

The registered mask function keeps the mask compact: instead of a dense [B, 1, Sq, Sk] tensor
it hands the attention function the 2-D key-validity mask (or None), which is folded into the
interval description as fully masked columns. Where the compact form cannot express the layout
(static caches, packed sequences, custom mask functions, a user-supplied 4-D mask) the dense
mask is built as for "sdpa" and the attention runs SDPA with it (combined with masked_rows).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from monet_fast._optional import require

ATTN_IMPLEMENTATION = "monet_latent"


_KERNELS: ModuleType | None = None


def _kernels() -> ModuleType:
    """monet_fast.kernels.latent_attention, imported on first use: it needs Triton, which is not
    installed everywhere (no wheels off Linux), and importing the model must not need it.
    A plain global (not functools.cache) so that torch.compile reads it as a constant once
    `use_latent_attention` has imported it."""
    global _KERNELS
    if _KERNELS is None:
        require("triton", f"the {ATTN_IMPLEMENTATION!r} attention (Triton kernels)")
        _KERNELS = importlib.import_module("monet_fast.kernels.latent_attention")
    return _KERNELS


def latent_attention(*args, **kwargs) -> torch.Tensor:
    """`monet_fast.kernels.latent_attention.latent_attention` (imported on first call)."""
    return _kernels().latent_attention(*args, **kwargs)


def dense_mask(*args, **kwargs) -> torch.Tensor:
    """`monet_fast.kernels.latent_attention.dense_mask` (imported on first call)."""
    return _kernels().dense_mask(*args, **kwargs)


def latent_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function for "monet_latent": a 2-D bool key-validity mask [B, kv_length], None
    when nothing is padded, or (layouts the compact form cannot express) sdpa's dense mask."""
    compact = (
        mask_function is causal_mask_function
        and kv_offset == 0
        and isinstance(q_offset, int)
        and q_offset + q_length == kv_length  # Sk - Sq is the offset the attention derives
    )
    if not compact:
        kwargs["allow_is_causal_skip"] = False
        return sdpa_mask(
            batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
            **kwargs,
        )  # fmt: skip
    if attention_mask is None:
        return None
    valid = attention_mask[:, :kv_length].to(torch.bool)
    if valid.shape[-1] < kv_length:  # positions beyond the 2-D mask are valid, as in sdpa_mask
        valid = torch.nn.functional.pad(valid, (0, kv_length - valid.shape[-1]), value=True)
    if torch.compiler.is_compiling():
        return valid  # no data-dependent branch in a compiled graph: always fold the padding
    # One host sync per forward (the mask is built once, not per layer), to keep the
    # unpadded case on the kernel's mask-free path.
    return None if bool(valid.all()) else valid


# Memo of the last (masked_rows, 2-D mask) -> combined description, so that all layers of one
# forward pass share one tensor (and so one tile plan inside latent_attention).
_last_combined: tuple[object, int | None, torch.Tensor, torch.Tensor] | None = None


def _with_key_padding(masked_rows: torch.Tensor | None, key_valid: torch.Tensor) -> torch.Tensor:
    """Fold a 2-D key-validity mask into masked_rows: padding columns mask every row."""
    global _last_combined
    if torch.compiler.is_compiling():
        # Traced graphs get no Python-side memo (each layer folds the padding itself, and the
        # op then builds one tile plan per layer); version None skips the memo below.
        version = None
    else:
        try:
            version = masked_rows._version if masked_rows is not None else 0
        except RuntimeError:  # an inference tensor has no version counter: no safe memo
            version = None
    if _last_combined is not None and version is not None:
        # key_valid is built by `latent_mask` once per forward and never modified: its
        # identity is enough.
        mr0, v0, kv0, combined = _last_combined
        if mr0 is masked_rows and kv0 is key_valid and v0 == version:
            return combined
    B, Sk = key_valid.shape
    if masked_rows is not None and masked_rows.shape[1] < Sk:
        raise ValueError(f"masked_rows covers {masked_rows.shape[1]} keys, the attention has {Sk}")
    if masked_rows is None:
        mr = torch.zeros(B, Sk, 4, dtype=torch.int32, device=key_valid.device)
    else:
        mr = masked_rows[:, :Sk].to(device=key_valid.device, dtype=torch.int32).expand(B, Sk, 4)
    padding = torch.tensor(_kernels().PADDING_COLUMN, dtype=torch.int32, device=key_valid.device)
    combined = torch.where(key_valid[..., None], mr, padding)
    if version is not None:
        _last_combined = (masked_rows, version, key_valid, combined)
    return combined


def latent_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    masked_rows: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
    q_offset: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> ([B, Sq, Hq, D],
    None). GQA is handled by the kernel (no repeat_kv)."""
    if dropout:
        raise ValueError(f"{ATTN_IMPLEMENTATION} has no attention dropout, got dropout={dropout}")
    Sq, Sk = query.shape[2], key.shape[2]
    offset = Sk - Sq if q_offset is None else int(q_offset)
    if attention_mask is not None and attention_mask.dim() == 4:
        # Dense path (static cache, packed sequences or a user 4-D mask): intersect with the
        # latent mask and run SDPA, exactly as "sdpa" would.
        if masked_rows is not None or kv_lens is not None:
            allowed = dense_mask(masked_rows, Sq, Sk, offset, kv_lens, device=query.device)
            if attention_mask.dtype == torch.bool:
                attention_mask = attention_mask & allowed
            else:
                attention_mask = attention_mask.masked_fill(~allowed, torch.finfo(attention_mask.dtype).min)  # fmt: skip
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    plain = masked_rows is None and kv_lens is None and attention_mask is None
    if plain and offset == Sk - Sq and (Sq == Sk or Sq == 1):
        # Plain causal without padding: SDPA's fused causal kernels are the strongest choice,
        # and for Sq == Sk (is_causal) or one decode step (no mask) its alignment is right.
        return sdpa_attention_forward(
            module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs
        )
    if attention_mask is not None:
        masked_rows = _with_key_padding(masked_rows, attention_mask)
    out = latent_attention(query, key, value, masked_rows, offset, kv_lens, scaling)
    return out.transpose(1, 2).contiguous(), None


def register_latent_attention() -> None:
    """Register "monet_latent" with transformers (attention and mask functions); idempotent."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, latent_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, latent_mask)


def use_latent_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch the language model of `model` (Qwen2.5-VL or a text-only HF model) to
    "monet_latent"; a vision tower keeps its attention. Returns the model."""
    register_latent_attention()
    _kernels()  # import the kernels (and register the custom ops) now, outside any compile
    if "text_config" in getattr(model.config, "sub_configs", {}):
        model.set_attn_implementation({"text_config": ATTN_IMPLEMENTATION})
    else:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


register_latent_attention()
