"""Mask planning for the latent-attention kernels (plain torch, O(B * Sk), once per mask).

`LatentMaskPlan` canonicalises the column-wise interval mask ([B, Sk, 4] `masked_rows`, kv_lens
folded in), classifies every (query tile, key tile) pair as SKIP / PARTIAL / FULL from the
min/max of its interval ends, and turns the classes into per-tile index lists (as FlexAttention's
BlockMask does), so the kernels in `latent_attention.py` loop without branches and skipped tiles
cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

# Tile classes (the int8 values of `LatentMaskPlan.tile_classes`).
SKIP, PARTIAL, FULL = 0, 1, 2
# End of an interval that reaches past any row ("masked until the end").
ROW_END = 2**31 - 1
# A key column no row may see (padding), in canonical form (second interval empty).
PADDING_COLUMN = (0, ROW_END, ROW_END, 0)


def _canonical_masked_rows(
    masked_rows: torch.Tensor | None, kv_lens: torch.Tensor | None, batch: int, n_k: int,
    device: torch.device,
) -> torch.Tensor | None:  # fmt: skip
    """[B, Sk, 4] int32 with empty intervals written as (ROW_END, 0) and kv_lens folded in
    (padding keys -> PADDING_COLUMN), or None for plain causal attention.

    (ROW_END, 0) is empty for the kernel's interval test like any r0 >= r1, and it is the form
    that never spoils a tile's min/max summary: its start is after, its end before, any row.
    """
    if masked_rows is None and kv_lens is None:
        return None
    if masked_rows is None:
        mr = torch.zeros(batch, n_k, 4, dtype=torch.int32, device=device)
    else:
        if masked_rows.dim() != 3 or masked_rows.shape[-1] != 4:
            raise ValueError(f"masked_rows must be [B, Sk, 4], got {tuple(masked_rows.shape)}")
        if masked_rows.shape[0] not in (1, batch) or masked_rows.shape[1] < n_k:
            raise ValueError(
                f"masked_rows {tuple(masked_rows.shape)} does not cover batch {batch} and {n_k} keys"
            )
        mr = masked_rows[:, :n_k].to(device=device, dtype=torch.int32).expand(batch, n_k, 4)
    lo, hi = mr[..., 0::2], mr[..., 1::2]
    empty = lo >= hi
    mr = torch.stack([lo.masked_fill(empty, ROW_END), hi.masked_fill(empty, 0)], -1).flatten(-2)
    if kv_lens is not None:
        kv_lens = torch.as_tensor(kv_lens, device=device).reshape(-1)
        if kv_lens.numel() != batch:
            raise ValueError(f"kv_lens must have {batch} entries, got {kv_lens.numel()}")
        pad = torch.arange(n_k, device=device)[None, :] >= kv_lens[:, None]
        mr = torch.where(pad[..., None], torch.tensor(PADDING_COLUMN, device=device), mr)
    return mr.contiguous()


@dataclass
class TileLists:
    """Per row tile (query-major) or column tile (key-major): counts and indices of the full
    and partial tiles to visit, each index list padded to the tile count."""

    full_cnt: torch.Tensor  # [B, R] int32
    full_idx: torch.Tensor  # [B, R, C] int32, the first full_cnt entries are valid
    part_cnt: torch.Tensor
    part_idx: torch.Tensor


class LatentMaskPlan:
    """Everything the kernels need to know about one mask, computed once and memoised.

    Holds the canonical [B, Sk, 4] interval tensor and, per block shape, the int8 tile classes
    [B, n_q_tiles, n_k_tiles] (SKIP / PARTIAL / FULL) and their index lists.
    """

    def __init__(
        self, masked_rows: torch.Tensor | None, kv_lens: torch.Tensor | None, batch: int,
        n_q: int, n_k: int, q_offset: int, device: torch.device | str,
    ) -> None:  # fmt: skip
        if q_offset < 0:
            raise ValueError(f"q_offset must be >= 0, got {q_offset}")
        self.batch, self.n_q, self.n_k, self.q_offset = batch, n_q, n_k, int(q_offset)
        self.device = torch.device(device)
        self.masked_rows = _canonical_masked_rows(masked_rows, kv_lens, batch, n_k, self.device)
        self._classes: dict[tuple[int, int], torch.Tensor] = {}
        self._lists: dict[tuple[int, int, bool], TileLists] = {}

    def tile_classes(self, block_m: int, block_n: int) -> torch.Tensor:
        """int8 [B, n_q_tiles, n_k_tiles]: SKIP if no pair of the tile is allowed, FULL if every
        pair (valid rows x columns) is allowed, else PARTIAL. Conservative: a tile that is in
        fact full or empty may be called PARTIAL (correct, only slower), never the reverse."""
        key = (block_m, block_n)
        if key in self._classes:
            return self._classes[key]
        dev, nq, nk = self.device, triton.cdiv(self.n_q, block_m), triton.cdiv(self.n_k, block_n)
        m = torch.arange(nq, device=dev)
        p0 = (self.q_offset + m * block_m)[None, :, None]  # first / last valid row position
        p1 = (self.q_offset + torch.clamp((m + 1) * block_m, max=self.n_q) - 1)[None, :, None]
        n = torch.arange(nk, device=dev)
        j0, j1 = (n * block_n)[None, None, :], ((n + 1) * block_n - 1)[None, None, :]
        skip = j0 > p1  # the whole key tile is in the future of the whole query tile
        # Full needs every column of the (unclamped) tile to exist: columns past Sk are loaded
        # as zeros and would get weight exp(0) if not masked.
        full = (j1 <= p0) & (j1 < self.n_k)
        if self.masked_rows is not None:
            pad = nk * block_n - self.n_k  # columns past Sk count as padding
            mr = F.pad(self.masked_rows, (0, 0, 0, pad))
            mr[:, self.n_k :] = torch.tensor(PADDING_COLUMN, device=dev, dtype=torch.int32)
            mr = mr.view(self.batch, nk, block_n, 4)
            lo, hi = mr.amin(2)[:, None], mr.amax(2)[:, None]  # [B, 1, nk, 4]
            r0min, r1min, r2min, r3min = lo.unbind(-1)
            r0max, r1max, r2max, r3max = hi.unbind(-1)
            # Every column's interval 1 (or every column's interval 2) covers all rows.
            covered = ((r0max <= p0) & (r1min > p1)) | ((r2max <= p0) & (r3min > p1))
            # Every column's intervals end before the first row or start after the last one.
            free = ((r1max <= p0) | (r0min > p1)) & ((r3max <= p0) | (r2min > p1))
            skip = skip | covered
            full = full & free
        classes = torch.full(torch.broadcast_shapes(skip.shape, (self.batch, nq, nk)), PARTIAL, dtype=torch.int8, device=dev)  # fmt: skip
        classes.masked_fill_(full.expand_as(classes), FULL)
        classes.masked_fill_(skip.expand_as(classes), SKIP)
        self._classes[key] = classes
        return classes

    def tile_lists(self, block_m: int, block_n: int, key_major: bool = False) -> TileLists:
        """Index lists of full / partial tiles, per query tile (or per key tile if key_major)."""
        key = (block_m, block_n, key_major)
        if key not in self._lists:
            classes = self.tile_classes(block_m, block_n)
            if key_major:
                classes = classes.transpose(1, 2)
            lists = []
            for kind in (FULL, PARTIAL):
                hit = classes == kind
                # Stable sort puts the hits first, in increasing tile order.
                idx = torch.argsort((~hit).to(torch.int8), dim=-1, stable=True)
                lists += [hit.sum(-1, dtype=torch.int32), idx.to(torch.int32).contiguous()]
            self._lists[key] = TileLists(*lists)
        return self._lists[key]


__all__ = ["FULL", "PADDING_COLUMN", "PARTIAL", "ROW_END", "SKIP", "LatentMaskPlan", "TileLists"]
