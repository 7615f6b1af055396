"""The compact stage-2 attention mask `masked_rows` [B, L, 4]: one writer, and a builder from token
ids alone (`mask_from_ids`) for training scripts that do not use monet_fast's collate.

Format (int32, one row per key column j): `masked_rows[b, j] = (r0, r1, r2, r3)` means query
rows [r0, r1) and [r2, r3) may not see key j, on top of causality. An image-pad column j of an
auxiliary image whose latent slots are [a0, a1) is (j, a0, a1, L): the image is hidden from
everything but its own latent slots. Padding columns are (0, L, 0, 0); every other column is
(0, 0, 0, 0). Empty intervals (r0 >= r1) are allowed.

Plain torch and no Triton, so that `monet_fast.model.sequence` (collate) and
`monet_fast.kernels` (the public API) share it without either importing the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Span = tuple[int, int]


def masked_rows_from_spans(
    pairs: Sequence[Sequence[tuple[Span, Span]]], valid: Sequence[Span], seq_len: int
) -> torch.Tensor:
    """int32 [B, seq_len, 4] from, per row, (image-pad span [i0, i1), latent slots [a0, a1))
    pairs and the valid (non-padding) span [lo, hi); everything outside it is padding."""
    if len(pairs) != len(valid):
        raise ValueError(f"got {len(pairs)} rows of pairs but {len(valid)} valid spans")
    rows = torch.zeros(len(pairs), seq_len, 4, dtype=torch.int32)
    for b, ((lo, hi), row_pairs) in enumerate(zip(valid, pairs)):
        rows[b, :lo, 1] = seq_len  # left padding: (0, L, 0, 0)
        rows[b, hi:, 1] = seq_len  # right padding
        for (i0, i1), (a0, a1) in row_pairs:
            rows[b, i0:i1, 0] = torch.arange(i0, i1, dtype=torch.int32)
            rows[b, i0:i1, 1] = a0
            rows[b, i0:i1, 2] = a1
            rows[b, i0:i1, 3] = seq_len
    return rows


def _valid_span(mask_row: list[int] | None, length: int) -> Span:
    if mask_row is None:
        return 0, length
    on = [i for i, m in enumerate(mask_row) if m]
    return (on[0], on[-1] + 1) if on else (0, 0)


def _row_pairs(
    ids: list[int], lo: int, hi: int, image_pad_id: int, latent_start_id: int,
    latent_pad_id: int, max_gap: int,
) -> list[tuple[Span, Span]]:  # fmt: skip
    pairs = []
    for s in range(lo, hi):
        if ids[s] != latent_start_id:
            continue
        a1 = s + 1
        while a1 < hi and ids[a1] == latent_pad_id:
            a1 += 1
        # The paired image ends at most max_gap tokens before the block (`<|vision_end|>`).
        i1 = s
        while i1 > lo and s - i1 < max_gap and ids[i1 - 1] != image_pad_id:
            i1 -= 1
        if i1 <= lo or ids[i1 - 1] != image_pad_id:
            continue  # a latent block without an image right before it (stage 3 / inference)
        i0 = i1 - 1
        while i0 > lo and ids[i0 - 1] == image_pad_id:
            i0 -= 1
        pairs.append(((i0, i1), (s + 1, a1)))
    return pairs


def mask_from_ids(
    input_ids: torch.Tensor,
    image_pad_id: int,
    latent_start_id: int,
    latent_pad_id: int,
    attention_mask: torch.Tensor | None = None,
    *,
    max_gap: int = 1,
) -> torch.Tensor:
    """The compact stage-2 mask of a batch of token rows, int32 [B, L, 4] on input_ids' device.

    A latent block is a `latent_start_id` token followed by its `latent_pad_id` slots; its
    auxiliary image is the run of `image_pad_id` tokens ending at most `max_gap` tokens before
    the block (1: the `<|vision_end|>` between them in Monet's stage-2 layout
    `<|vision_start|> <|image_pad|>* <|vision_end|> <abs_vis_token> <abs_vis_token_pad>*K ...`).
    Blocks with no image right before them (stage 3, inference) and images with no block after
    them (question images) mask nothing. Positions where attention_mask [B, L] is 0 (left or
    right padding) are padding columns. For rows rendered by monet_fast this equals collate's
    `masked_rows`; the Qwen2.5-VL ids are image_pad 151655, and Monet's `<abs_vis_token>` /
    `<abs_vis_token_pad>` get 151666 / 151665 on the stock tokenizer (look them up with
    `tokenizer.convert_tokens_to_ids`).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
            f"{tuple(input_ids.shape)}"
        )
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    length = input_ids.shape[1]
    ids = input_ids.tolist()
    masks = attention_mask.tolist() if attention_mask is not None else [None] * len(ids)
    valid = [_valid_span(m, length) for m in masks]
    pairs = [
        _row_pairs(row, lo, hi, image_pad_id, latent_start_id, latent_pad_id, max_gap)
        for row, (lo, hi) in zip(ids, valid)
    ]
    return masked_rows_from_spans(pairs, valid, length).to(input_ids.device)
