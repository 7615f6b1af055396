"""Typed Python entry points into the compiled extension `monet_fast._C`, one per C++ op.

Every op has the same name and argument order as its C++ host function (`csrc/ops.h`) and a
pure-torch implementation next to it (`<op>_torch`) with identical semantics: the fallback when
the extension cannot run the op (e.g. a CUDA tensor with a CPU-only build) and the reference the
tests compare the C++/CUDA code with (as vLLM's `_custom_ops.py` does).
"""

from __future__ import annotations

import functools
import warnings

import torch

# Decode-state codes, shared with csrc/latent_decode_state.h.
MODE_TEXT = 0
MODE_LATENT = 1
MODE_DONE = 2
LAYOUT_IDS = {"sft": 0, "monet_vllm": 1}


def _ext():
    import monet_fast

    return monet_fast._C


@functools.cache
def _has_cuda_build() -> bool:
    info = _ext().build_info()
    if not info.get("cuda", False):
        # Asked only for CUDA tensors; the build log's warning is easy to miss (pip hides it).
        warnings.warn(
            f"monet_fast._C was built without its CUDA kernels ({info.get('cuda_reason', '?')}); "
            "CUDA tensors take the slower torch fallback. Rebuild with nvcc and "
            "MONET_FAST_REQUIRE_CUDA=1 (see README, Building on CUDA machines)",
            stacklevel=3,
        )
    return bool(info.get("cuda", False))


def latent_step(
    sampled_ids: torch.Tensor,
    hidden: torch.Tensor,
    embed_weight: torch.Tensor,
    eos_ids: torch.Tensor,
    mode: torch.Tensor,
    count: torch.Tensor,
    n_blocks: torch.Tensor,
    remaining: torch.Tensor,
    emit_ids: torch.Tensor,
    use_hidden: torch.Tensor,
    next_embeds: torch.Tensor,
    layout: int,
    latent_size: int,
    start_id: int,
    end_id: int,
    slot_id: int,
    fill_id: int,
    max_blocks: int,
) -> None:
    """One step of the latent decode state machine for a batch, in place (no host sync).

    Shapes: sampled_ids [B] int64 (sampled from this step's logits); hidden [B, H] this step's
    final post-norm hidden states; embed_weight [V, H] (same dtype as hidden); eos_ids [E] int64;
    state mode / count / n_blocks / remaining [B] int32 (updated); outputs emit_ids [B] int64,
    use_hidden [B] bool, next_embeds [B, H] (= hidden[b] where use_hidden else
    embed_weight[emit_ids[b]]). `layout` is 0 (sft) or 1 (monet_vllm); semantics in
    csrc/latent_decode_state.h and `latent_step_torch`.
    """
    args = (
        sampled_ids,
        hidden,
        embed_weight,
        eos_ids,
        mode,
        count,
        n_blocks,
        remaining,
        emit_ids,
        use_hidden,
        next_embeds,
        layout,
        latent_size,
        start_id,
        end_id,
        slot_id,
        fill_id,
        max_blocks,
    )
    if sampled_ids.is_cuda and not _has_cuda_build():
        latent_step_torch(*args)
        return
    _ext().latent_step(*args)


def latent_step_torch(
    sampled_ids: torch.Tensor,
    hidden: torch.Tensor,
    embed_weight: torch.Tensor,
    eos_ids: torch.Tensor,
    mode: torch.Tensor,
    count: torch.Tensor,
    n_blocks: torch.Tensor,
    remaining: torch.Tensor,
    emit_ids: torch.Tensor,
    use_hidden: torch.Tensor,
    next_embeds: torch.Tensor,
    layout: int,
    latent_size: int,
    start_id: int,
    end_id: int,
    slot_id: int,
    fill_id: int,
    max_blocks: int,
) -> None:
    """Pure-torch `latent_step` (same arguments, same in-place effects), vectorised over B.

    Per sequence, with K = latent_size (the C++ code in csrc/latent_decode_state.h is the same
    rule written as a branch per case):

    * done: emit `fill_id`.
    * sft, latent, count > 0: emit `slot_id`, feed the hidden state back, count -= 1.
    * sft, latent, count == 0: emit `end_id` (forced close), back to text.
    * sft, text, sampled START and blocks < max_blocks: emit START (its embedding is the next
      input), enter latent mode with count = K.
    * monet_vllm, latent: sampled END or count >= K -> emit END, back to text (the sampled id is
      replaced); else sampled EOS -> emit it and stop (vLLM stops on the placeholder); else emit
      `slot_id`, feed back, count += 1.
    * monet_vllm, text, sampled START and blocks < max_blocks: emit START and feed the hidden
      state back into START's own row, count = 1.
    * text, sampled EOS: emit it, done. Otherwise emit the sampled id.
    * every sequence that was not done: remaining -= 1; done when it reaches 0.
    """
    if layout not in (0, 1):
        raise ValueError(f"layout must be 0 (sft) or 1 (monet_vllm), got {layout!r}")
    if latent_size < 1:
        raise ValueError(f"latent_size must be >= 1, got {latent_size}")
    s = sampled_ids
    done = mode == MODE_DONE
    latent = mode == MODE_LATENT
    text = mode == MODE_TEXT
    is_eos = torch.isin(s, eos_ids)
    opens = text & (s == start_id) & (n_blocks < max_blocks)
    text_eos = text & ~opens & is_eos

    if layout == 0:
        slot = latent & (count > 0)
        close = latent & (count == 0)
        latent_eos = torch.zeros_like(done)
        new_count = torch.where(slot, count - 1, torch.where(opens, latent_size, count))
        fed_back = slot
    else:
        close = latent & ((s == end_id) | (count >= latent_size))
        latent_eos = latent & ~close & is_eos
        slot = latent & ~close & ~latent_eos
        new_count = torch.where(
            close, 0, torch.where(slot, count + 1, torch.where(opens, 1, count))
        )
        fed_back = slot | opens

    emit = torch.where(slot, slot_id, s)
    emit = torch.where(close, end_id, emit)
    emit = torch.where(done, fill_id, emit)
    new_mode = torch.where(opens, MODE_LATENT, mode)
    new_mode = torch.where(close, MODE_TEXT, new_mode)
    new_mode = torch.where(text_eos | latent_eos, MODE_DONE, new_mode)
    new_remaining = torch.where(done, remaining, remaining - 1)
    new_mode = torch.where(~done & (new_remaining <= 0), MODE_DONE, new_mode)

    fed_back = fed_back & ~done
    # A bounds check needs the host; skip it on CUDA so the step stays capturable in a graph
    # (the embedding gather below still faults on a bad id there).
    if not emit.is_cuda and bool((emit < 0).any() | (emit >= embed_weight.shape[0]).any()):
        raise RuntimeError(
            f"latent_step: an emitted token id is outside the embedding table "
            f"[0, {embed_weight.shape[0]})"
        )
    rows = torch.where(fed_back.unsqueeze(-1), hidden, embed_weight[emit])
    next_embeds.copy_(rows)
    count.copy_(new_count.to(count.dtype))
    n_blocks.add_(opens.to(n_blocks.dtype))
    remaining.copy_(new_remaining)
    mode.copy_(new_mode.to(mode.dtype))
    emit_ids.copy_(emit)
    use_hidden.copy_(fed_back)
