"""Join one-row prompt batches into one right-padded batch, for a batched slot prefill.

Each request of the server is prepared alone (`inputs.prepare_batch` on one input). When several
join the running batch at the same time, `SlotDecoder.prefill_many` runs their prompts in one
forward: rows padded on the right, so row b's real tokens are its first `lengths[b]` columns and
its cache columns go to its slot unshifted (the prompt then attends over the same columns, at the
same offsets, as when prefilled alone). Images stay in row order: `pixel_values` and
`image_grid_thw` are concatenated as the processor does for a multi-row batch.
"""

from __future__ import annotations

import torch

from monet_fast.decode.inputs import PreparedBatch


def join_right_padded(batches: list[PreparedBatch], pad_id: int) -> tuple[PreparedBatch, list[int]]:
    """(one right-padded batch of the one-row `batches`, each row's prompt length)."""
    if not batches:
        raise ValueError("join_right_padded: no batches to join")
    lengths = []
    for i, batch in enumerate(batches):
        if batch.batch_size != 1 or not bool(batch.attention_mask.bool().all()):
            raise ValueError(
                f"join_right_padded: batch {i} must be one unpadded row; got shape "
                f"{tuple(batch.input_ids.shape)} with {int((batch.attention_mask == 0).sum())} "
                "padding column(s)"
            )
        lengths.append(int(batch.input_ids.shape[1]))
    width = max(lengths)

    def pad(name: str, value: int) -> torch.Tensor:
        rows = []
        for batch, length in zip(batches, lengths):
            row = getattr(batch, name)
            rows.append(torch.nn.functional.pad(row, (0, width - length), value=value))
        return torch.cat(rows, dim=0)

    pixels = [b.pixel_values for b in batches if b.pixel_values is not None]
    grids = [b.image_grid_thw for b in batches if b.image_grid_thw is not None]
    joined = PreparedBatch(
        texts=[t for b in batches for t in b.texts],
        forced_start=[f for b in batches for f in b.forced_start],
        input_ids=pad("input_ids", pad_id),
        attention_mask=pad("attention_mask", 0),
        mm_token_type_ids=pad("mm_token_type_ids", 0),
        pixel_values=torch.cat(pixels, dim=0) if pixels else None,
        image_grid_thw=torch.cat(grids, dim=0) if grids else None,
    )
    return joined, lengths
