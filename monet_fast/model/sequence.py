"""Sequence layout: segments + stage -> text, then token ids -> labels, latent slots, mRoPE
positions and the compact stage-2 attention mask.

Stages (the reference's sequences, REFERENCE.md §1.3):
  stage1  auxiliary images shown inline as images (also the teacher sequence of stage 2)
  stage2  each auxiliary image followed by `<abs_vis_token>` + K `<abs_vis_token_pad>` + `</abs_vis_token>`
  stage3  auxiliary images replaced by the K-slot latent block (what inference sees, `sft` layout)
  infer   same token layout as stage3 (scoring a sequence the way the decoder lays it out)

Everything after rendering works on token ids, as the reference does, so a batch tokenised by
any processor (tiny or real Qwen2.5-VL) gets the same treatment.

The stage-2 mask (True = may attend) is causal + padding, except that the image-pad tokens of
auxiliary image i are visible only to the K latent slots of latent block i. It is stored per key
column as two masked row intervals, `masked_rows[b, j] = (r0, r1, r2, r3)`: rows [r0, r1) and
[r2, r3) may not see key j. For an image-pad column j of aux image i with slots [a0, a1) that is
(j, a0, a1, L): the pads themselves (including j) and everything up to the first slot are
masked, the slots see it, everything after the block is masked again. Padding key columns are
(0, L, 0, 0). O(L) memory; the Triton kernel reads it directly, the dense expansion is for SDPA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from monet_fast.latent_mask import masked_rows_from_spans
from monet_fast.model import tokens as T
from monet_fast.stage import STAGE_NAMES

if TYPE_CHECKING:  # data imports this module for collate; keep the runtime import one-way
    from monet_fast.data.types import Sample

STAGES: tuple[str, ...] = STAGE_NAMES  # the values of monet_fast.stage.Stage
IGNORE_INDEX = -100


def check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def _latent_block(latent_size: int) -> str:
    return T.LATENT_START + T.LATENT_PAD * latent_size + T.LATENT_END


_IMAGE = T.VISION_START + T.IMAGE_PAD + T.VISION_END


def render_assistant(sample: Sample, stage: str, latent_size: int) -> str:
    """The assistant turn's text for `stage` (without the chat wrapper)."""
    check_stage(stage)
    parts = []
    for seg in sample.reasoning:
        if seg.kind == "aux_image":
            if stage == "stage1":
                parts.append(_IMAGE)
            elif stage == "stage2":
                parts.append(_IMAGE + _latent_block(latent_size))
            else:
                parts.append(_latent_block(latent_size))
        elif seg.kind == "observation":
            parts.append(T.OBS_START + seg.text + T.OBS_END)
        elif seg.kind == "image":
            raise ValueError(
                f"sample {sample.key}: question images belong to the user turn; "
                "use 'aux_image' for images in the reasoning"
            )
        else:
            parts.append(seg.text)
    return "".join(parts)


def render_prompt(sample: Sample) -> str:
    """System + user turn + the assistant header (what generation starts from)."""
    user = "".join(_IMAGE if seg.kind == "image" else seg.text for seg in sample.question)
    return (
        f"{T.IM_START}system\n{sample.system}{T.IM_END}\n"
        f"{T.IM_START}user\n{user}{T.IM_END}\n"
        f"{T.IM_START}assistant\n"
    )


def render(sample: Sample, stage: str, latent_size: int = 8) -> tuple[str, list]:
    """Full chat text of `sample` for `stage` and the images the processor must receive, in order.

    Matches the reference's `apply_chat_template` output followed by its placeholder rewrites.
    """
    check_stage(stage)
    if latent_size < 1 and stage != "stage1":
        raise ValueError(f"latent_size must be >= 1, got {latent_size}")
    for seg in sample.question:
        if seg.kind not in ("image", "text"):
            raise ValueError(
                f"sample {sample.key}: the question may hold 'image' and 'text' segments, "
                f"got {seg.kind!r}"
            )
    text = render_prompt(sample) + render_assistant(sample, stage, latent_size) + f"{T.IM_END}\n"
    images = list(sample.question_images)
    if stage in ("stage1", "stage2"):
        images += sample.aux_images
    return text, images


@dataclass
class LatentBlock:
    """Positions of one latent block in a token row."""

    start: int  # `<abs_vis_token>`
    slots: tuple[int, int]  # [a0, a1): the `<abs_vis_token_pad>` latent slots
    end: int | None  # `</abs_vis_token>` (None if the row ends inside the block)
    aux_image: tuple[int, int] | None = (
        None  # [i0, i1) image pads of the paired aux image (stage 2)
    )


@dataclass
class SequenceLayout:
    """Where things are in one token row (absolute indices into the padded row)."""

    length: int  # padded row length
    valid: tuple[int, int]  # [first, last+1) of the non-padding tokens
    assistant_start: int  # first position that may carry a label (after `<|im_start|>assistant`)
    latent_blocks: list[LatentBlock] = field(default_factory=list)
    observation_spans: list[tuple[int, int]] = field(
        default_factory=list
    )  # [pos(<obs>), pos(</obs>))
    aux_images: list[tuple[int, int]] = field(
        default_factory=list
    )  # image-pad ranges after the assistant start

    @property
    def slot_positions(self) -> list[int]:
        return [p for blk in self.latent_blocks for p in range(*blk.slots)]

    @property
    def observation_positions(self) -> list[int]:
        """Teacher/student alignment positions: `<observation>` tag through the last content token."""
        return [p for s, e in self.observation_spans for p in range(s, e)]


def _find(ids: Sequence[int], pattern: Sequence[int], start: int = 0) -> int:
    n = len(pattern)
    for i in range(start, len(ids) - n + 1):
        if list(ids[i : i + n]) == list(pattern):
            return i
    return -1


def _runs(ids: Sequence[int], token: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Maximal runs [s, e) of `token` in ids[lo:hi]."""
    runs, i = [], lo
    while i < hi:
        if ids[i] == token:
            j = i
            while j < hi and ids[j] == token:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


def layout_from_ids(
    ids: Sequence[int],
    token_ids: T.TokenIds,
    assistant_pattern: Sequence[int],
    attention_mask: Sequence[int] | None = None,
) -> SequenceLayout:
    """Parse one token row into a SequenceLayout (the reference's find_ids_poss / find_segments_1d).

    Only tokens after the first `<|im_start|>assistant` count as reasoning: images there are
    auxiliary images (paired in order with latent blocks), `<observation>` tags there are spans.
    The reference pairs aux images by dropping the first vision pair, which is wrong for
    several question images; pairing by turn is the same for single-image questions.
    """
    ids = list(ids)
    length = len(ids)
    if attention_mask is None:
        valid = (0, length)
    else:
        on = [i for i, m in enumerate(attention_mask) if m]
        valid = (on[0], on[-1] + 1) if on else (0, 0)
    lo, hi = valid
    ans = _find(ids[:hi], assistant_pattern, lo)
    if ans < 0:
        return SequenceLayout(length=length, valid=valid, assistant_start=hi)
    start = ans + len(assistant_pattern)

    aux_images = []
    pos = start
    while True:
        vs = (
            ids.index(token_ids.vision_start, pos, hi)
            if token_ids.vision_start in ids[pos:hi]
            else -1
        )
        if vs < 0:
            break
        pads = [p for p in range(vs + 1, hi) if ids[p] == token_ids.image_pad]
        ve = ids.index(token_ids.vision_end, vs, hi) if token_ids.vision_end in ids[vs:hi] else hi
        inside = [p for p in pads if p < ve]
        aux_images.append((inside[0], inside[-1] + 1) if inside else (vs + 1, vs + 1))
        pos = ve + 1

    blocks = []
    for s in [p for p in range(start, hi) if ids[p] == token_ids.latent_start]:
        a1 = s + 1
        while a1 < hi and ids[a1] == token_ids.latent_pad:
            a1 += 1
        end = a1 if a1 < hi and ids[a1] == token_ids.latent_end else None
        blocks.append(LatentBlock(start=s, slots=(s + 1, a1), end=end))
    for blk, img in zip(blocks, aux_images):
        blk.aux_image = img

    spans = []
    for s in [p for p in range(start, hi) if ids[p] == token_ids.obs_start]:
        e = next((p for p in range(s + 1, hi) if ids[p] == token_ids.obs_end), hi)
        spans.append((s, e))
    return SequenceLayout(
        length=length,
        valid=valid,
        assistant_start=start,
        latent_blocks=blocks,
        observation_spans=spans,
        aux_images=aux_images,
    )


def ignored_label_ids(
    token_ids: T.TokenIds, stage: str, label_observation_tags: bool = False
) -> set[int]:
    """Token ids that never carry CE loss in `stage` (the reference's ignore lists).

    The reference also ignores `<observation>`/`</observation>`, so its models never learn to
    write them: after a latent block the next token is untrained. `label_observation_tags=True`
    trains the tags like text (the observation weight still applies to the content only).
    """
    check_stage(stage)
    ignore = {
        token_ids.endoftext,
        token_ids.image_pad,
        token_ids.vision_start,
        token_ids.vision_end,
    }
    if not label_observation_tags:
        ignore |= {token_ids.obs_start, token_ids.obs_end}
    if stage != "stage1":
        ignore |= {token_ids.latent_pad, token_ids.latent_end}
    return ignore


def labels_for_row(ids: Sequence[int], layout: SequenceLayout, ignore: set[int]) -> list[int]:
    """Labels aligned with ids (HF convention: the model shifts): -100 before the assistant
    start, outside the valid span and on ignored ids; the token id elsewhere."""
    lo, hi = layout.valid
    out = []
    for p, tok in enumerate(ids):
        keep = layout.assistant_start <= p < hi and p >= lo and tok not in ignore
        out.append(int(tok) if keep else IGNORE_INDEX)
    return out


def observation_label_mask(layout: SequenceLayout) -> list[bool]:
    """True at observation content tokens (the labels the CE emphasis factor up-weights).

    The reference up-weights logit rows pos-1 for pos in [pos(<obs>), pos(</obs>)); the tag's own
    label is ignored, so in label coordinates that is the content (s, e).
    """
    mask = [False] * layout.length
    for s, e in layout.observation_spans:
        for p in range(s + 1, e):
            mask[p] = True
    return mask


def masked_rows_from_layout(
    layouts: Sequence[SequenceLayout], seq_len: int | None = None
) -> torch.Tensor:
    """The compact stage-2 mask, int32 [B, L, 4] (see the module docstring), written by the
    shared `monet_fast.latent_mask.masked_rows_from_spans` (also behind `mask_from_ids`)."""
    seq_len = seq_len or max(lay.length for lay in layouts)
    pairs = [
        [(blk.aux_image, blk.slots) for blk in lay.latent_blocks if blk.aux_image is not None]
        for lay in layouts
    ]
    return masked_rows_from_spans(pairs, [lay.valid for lay in layouts], seq_len)


def allowed_mask(
    masked_rows: torch.Tensor | None,
    seq_len: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense bool [B, 1, L, L] (True = may attend) for the SDPA path and for tests.

    Causal, minus key columns that are padding, minus the masked row intervals.
    """
    q = torch.arange(seq_len).view(1, seq_len, 1)
    k = torch.arange(seq_len).view(1, 1, seq_len)
    allowed = (k <= q).expand(1 if masked_rows is None else masked_rows.shape[0], -1, -1).clone()
    if masked_rows is not None:
        mr = masked_rows.to(torch.long)
        r0, r1, r2, r3 = (mr[..., i].unsqueeze(1) for i in range(4))  # [B, 1, Lk]
        hidden = ((q >= r0) & (q < r1)) | ((q >= r2) & (q < r3))
        allowed &= ~hidden
    if attention_mask is not None:
        if allowed.shape[0] != attention_mask.shape[0]:
            allowed = allowed.expand(attention_mask.shape[0], -1, -1).clone()
        allowed &= attention_mask.bool().unsqueeze(1)
    return allowed.unsqueeze(1)


def rope_position_ids(
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    spatial_merge_size: int = 2,
) -> torch.Tensor:
    """3-D mRoPE position ids [3, B, L], equal to `Qwen2_5_VLModel.get_rope_index` for images.

    Text (and latent slots, which are ordinary text positions) advance all three axes by 1;
    an image of grid (t, h, w) spans (t, h/m, w/m) positions from the current offset, after which
    text continues at offset + max(h, w)/m. Padding positions are 0, as in transformers 5.
    """
    bsz, seq_len = input_ids.shape
    out = torch.zeros(3, bsz, seq_len, dtype=torch.long)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    for b in range(bsz):
        keep = (
            attention_mask[b].bool()
            if attention_mask is not None
            else torch.ones(seq_len, dtype=torch.bool)
        )
        types = mm_token_type_ids[b][keep].tolist()
        chunks, cur, i = [], 0, 0
        while i < len(types):
            j = i
            while j < len(types) and types[j] == types[i]:
                j += 1
            if types[i] == 0:
                chunks.append(torch.arange(cur, cur + j - i).view(1, -1).expand(3, -1))
                cur += j - i
            elif types[i] == 1:
                t, h, w = next(grids)
                gh, gw = h // spatial_merge_size, w // spatial_merge_size
                tt, hh, ww = torch.meshgrid(
                    torch.arange(t), torch.arange(gh) + cur, torch.arange(gw) + cur, indexing="ij"
                )
                pos = torch.stack([tt + cur, hh, ww]).reshape(3, -1)
                if pos.shape[1] != j - i:
                    raise ValueError(
                        f"row {b}: image grid {t}x{h}x{w} gives {pos.shape[1]} tokens but the "
                        f"row has {j - i} image tokens there"
                    )
                chunks.append(pos)
                cur += max(h, w) // spatial_merge_size
            else:
                raise ValueError("videos are not supported by monet_fast's sequence layout")
            i = j
        if chunks:
            out[:, b, keep] = torch.cat(chunks, dim=1)
    return out
