"""Batched one-pass latent forward for stages 1-3 (and for scoring given latents in VLPO).

The reference computes latents per sample and per latent step in Python, then runs a second
full forward for the losses. Here the whole batch goes through the stock text model (reached
through the architecture adapter, `monet_fast.model.arch`) segment by segment over one KV cache:

    text segment (one call) -> K latent steps (one call each) -> next text segment -> ...

Latent slot k's input embedding is the final post-RMSNorm hidden state at the position before
it (REFERENCE.md §7.1), fed back unchanged. Samples have their latent blocks at different
positions, so the batch is first re-laid out: the i-th latent block of every sample is put in
the same columns by inserting padding columns inside the rows (padding keys are masked for
every query; positions are explicit mRoPE ids, so gaps do not shift anything). Losses are then
read off the same graph: no second forward.

Gradients: backprop runs through the whole graph, including the latent chain (latent k+1
depends on latent k through its input). This equals the reference's two-pass gradient without
its `latent_embed.detach()` on pass-1 inputs; `monet_fast.model.latent_reference` implements
both and the tests check ours against it. Stage 2's alignment reaches the parameters only through
the latent vectors, as in the reference (see `losses.latent_proxy_loss`).

Mask: the stage-2 mask is honoured in every segment, including while latents are computed. The
reference computes latents with plain causal attention (latents see every aux image, image pads
see each other) and applies the mask only in its second pass; `mask_mode="reference"` of the
two-pass implementation reproduces that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from monet_fast._compat import cache_kwarg
from monet_fast.data.latent_batch import LatentBatch
from monet_fast.model import sequence as seq
from monet_fast.model.arch import VisualInputs, arch_of
from monet_fast.model.attention import ATTN_IMPLEMENTATION
from monet_fast.model.cache_checkpoint import cache_safe_checkpointing, checkpointing_requested
from monet_fast.model.config import LATENT_LAYOUTS
from monet_fast.model.feedback import FeedbackNorm
from monet_fast.model.losses import LatentGate, LossConfig, head_weighted_ce_sum, stage_loss


@dataclass
class LatentForwardOutput:
    """What one latent forward produced.

    latents: per sample, [n_slots, hidden] — the vector fed into each latent slot, slot order.
    loss: backward() of it gives the stage's gradient; its value is ce_loss + align_weight·align_loss.
    ce_sum / ce_weight and align_sum / align_count: un-normalised pieces for gradient accumulation.
    n_target_tokens: number of tokens that carry CE loss.
    obs_states / slot_states: per sample [n_layers+1, n, hidden] all-layer states at observation
    positions / latent slots, when requested (teacher targets for stages 2 and 3).
    """

    latents: list[torch.Tensor]
    loss: torch.Tensor
    ce_loss: torch.Tensor
    align_loss: torch.Tensor | None
    ce_sum: torch.Tensor
    ce_weight: torch.Tensor
    align_sum: torch.Tensor
    align_count: int
    n_target_tokens: int
    obs_states: list[torch.Tensor] | None = None
    slot_states: list[torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # [B, L, H] post-norm last hidden states (return_hidden)
    extras: dict = field(default_factory=dict)


def embed_inputs(model, batch: LatentBatch | dict) -> torch.Tensor:
    """Token embeddings with image features scattered into the image-pad rows, [B, L, H]."""
    return embed_visual(model, batch).embeds


def embed_visual(model, batch: LatentBatch | dict) -> VisualInputs:
    """`embed_inputs` plus the per-layer visual features some architectures add later
    (Qwen3-VL's DeepStack; None for Qwen2.5-VL). `batch`: a LatentBatch or a processor
    output (input_ids, pixel_values, image_grid_thw)."""
    if isinstance(batch, dict):
        ids, pixels, grid = (batch.get(k) for k in ("input_ids", "pixel_values", "image_grid_thw"))
    else:
        ids, pixels, grid = batch.input_ids, batch.pixel_values, batch.image_grid_thw
    return arch_of(model).embed(model, ids, pixels, grid)


def _check_blocks(batch: LatentBatch, latent_size: int) -> None:
    """sft: every block has exactly K slots after START. monet_vllm (VLPO replay of the released
    Monet-7B's runner): START's own row is the first slot and a block holds 1..K rows (an early
    END, an EOS or the end of the generation shortens it)."""
    layout = batch.latent_layout
    if layout not in LATENT_LAYOUTS:
        raise ValueError(f"latent_layout must be one of {list(LATENT_LAYOUTS)}, got {layout!r}")
    for b, lay in enumerate(batch.layouts):
        for blk in lay.latent_blocks:
            n = blk.slots[1] - blk.slots[0]
            if layout == "sft" and n != latent_size:
                raise ValueError(
                    f"sample {batch.keys[b]}: a latent block has {n} slots, expected "
                    f"latent_size={latent_size}"
                )
            if layout == "monet_vllm" and (blk.slots[0] != blk.start or not 1 <= n <= latent_size):
                raise ValueError(
                    f"sample {batch.keys[b]}: a monet_vllm latent block must start at its "
                    f"<abs_vis_token> row and hold 1..latent_size={latent_size} rows, got rows "
                    f"{blk.slots} with <abs_vis_token> at {blk.start}"
                )


@dataclass
class AlignedLayout:
    """The batch re-laid out so that latent block i of every sample sits in the same columns.

    col[b]: LongTensor mapping each original position of sample b to its new column (-1 for
    original padding). chunks: ("text", c0, c1) or ("slot", c, block index).
    """

    length: int
    col: list[torch.Tensor]
    valid: torch.Tensor  # [B, L'] bool
    chunks: list[tuple]
    slot_cols: list[int]


def align_layout(layouts: list[seq.SequenceLayout]) -> AlignedLayout:
    pieces = []  # per sample: list of (text range, slot range) per block + tail
    n_blocks = max((len(lay.latent_blocks) for lay in layouts), default=0)
    for lay in layouts:
        lo, hi = lay.valid
        segs, cur = [], lo
        for blk in lay.latent_blocks:
            segs.append(((cur, blk.slots[0]), blk.slots))
            cur = blk.slots[1]
        segs.append(((cur, hi), None))
        pieces.append(segs)
    widths, slot_counts = [], []
    for i in range(n_blocks + 1):
        w = 0
        for segs in pieces:
            if i < len(segs):
                w = max(w, segs[i][0][1] - segs[i][0][0])
        widths.append(w)
        if i < n_blocks:
            slot_counts.append(
                max(
                    (s[i][1][1] - s[i][1][0] for s in pieces if i < len(s) and s[i][1]),
                    default=0,
                )
            )
    total = sum(widths) + sum(slot_counts)
    bsz = len(layouts)
    valid = torch.zeros(bsz, total, dtype=torch.bool)
    cols = [torch.full((lay.length,), -1, dtype=torch.long) for lay in layouts]
    chunks, slot_cols, c = [], [], 0
    for i in range(n_blocks + 1):
        w = widths[i]
        if w:
            chunks.append(("text", c, c + w))
        for b, segs in enumerate(pieces):
            if i >= len(segs):
                continue
            (t0, t1), _ = segs[i]
            # Right-align text so its last token sits right before the slot columns: the first
            # latent reads the hidden state of the column just before it.
            start = c + w - (t1 - t0)
            cols[b][t0:t1] = torch.arange(start, start + t1 - t0)
            valid[b, start : start + t1 - t0] = True
        c += w
        if i < n_blocks:
            for k in range(slot_counts[i]):
                chunks.append(("slot", c + k, i))
                slot_cols.append(c + k)
            for b, segs in enumerate(pieces):
                if i < len(segs) and segs[i][1] is not None:
                    a0, a1 = segs[i][1]
                    cols[b][a0:a1] = torch.arange(c, c + a1 - a0)
                    valid[b, c : c + a1 - a0] = True
            c += slot_counts[i]
    return AlignedLayout(length=total, col=cols, valid=valid, chunks=chunks, slot_cols=slot_cols)


def _remap_rows(masked_rows: torch.Tensor, aligned: AlignedLayout) -> torch.Tensor:
    """Masked row intervals in the new columns; padding columns hidden from every row."""
    bsz = masked_rows.shape[0]
    new_len = aligned.length
    out = torch.zeros(bsz, new_len, 4, dtype=torch.int32)
    out[:, :, 1] = torch.where(aligned.valid, 0, new_len).to(torch.int32)
    for b in range(bsz):
        col = aligned.col[b]
        # A row boundary r maps to the column of original row r (or the end).
        bound = torch.cat([col, torch.tensor([new_len])])
        valid_pos = (col >= 0).nonzero().flatten()
        for p in valid_pos.tolist():
            r = masked_rows[b, p].long()
            if r[1] <= r[0] and r[3] <= r[2]:
                continue
            r = r.clamp(max=len(col))
            out[b, col[p]] = bound[r].to(torch.int32)
    return out


def _dense_float_mask(
    masked_rows: torch.Tensor | None, valid: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """[B, 1, L, L] additive mask (0 keep, finfo.min masked) for SDPA/eager attention."""
    length = valid.shape[1]
    allowed = seq.allowed_mask(masked_rows, length, valid.long())
    # A padding query with no visible key would give NaN in SDPA; let it see itself (its
    # output is never read).
    eye = torch.eye(length, dtype=torch.bool).view(1, 1, length, length)
    allowed = allowed | (eye & ~valid.view(-1, 1, length, 1))
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def _scatter_rows(
    values: torch.Tensor, aligned: AlignedLayout, fill: float | int = 0
) -> torch.Tensor:
    """Move [B, L, ...] values from original positions to the new columns."""
    out = values.new_full((values.shape[0], aligned.length, *values.shape[2:]), fill)
    for b, col in enumerate(aligned.col):
        keep = col >= 0
        out[b, col[keep]] = values[b, keep.to(values.device)]
    return out


def latent_forward(
    model,
    batch: LatentBatch,
    stage: str | None = None,
    teacher: list[torch.Tensor] | None = None,
    *,
    loss_config: LossConfig | None = None,
    latents: list[torch.Tensor] | None = None,
    return_states: bool = False,
    return_logits: bool = False,
    return_hidden: bool = False,
    teacher_layers: list[int] | None = None,
    checkpoint: bool | None = None,
) -> LatentForwardOutput:
    """Run a collated batch through the model with latent feedback and compute the stage losses.

    batch: from `monet_fast.data.collate` (right padding). stage: defaults to batch.stage.
    teacher: stage 2 — per sample [n_layers+1, n_obs, hidden] teacher states at observation
      positions; stage 3 — per sample [n_layers+1, n_slots, hidden] stage-2 latent trajectories.
      Without it the alignment term is skipped.
    latents: optional per-sample [n_slots, hidden] vectors to feed instead of the fed-back
      hidden states (replaying rollouts, interventions).
    batch.latent_layout (optional, default "sft"): "monet_vllm" replays the released
      Monet-7B's vLLM layout: a block's slots start at its `<abs_vis_token>` row and hold 1..K
      rows (`monet_fast.train.replay_vllm`); the feedback rule is the same (a slot's input is the
      hidden state of the row before it).
    return_states: also return all-layer states at observation positions and latent slots.
    return_hidden: also return the final post-norm hidden states [B, L, H] in the original
      (batch) coordinates, zero at padding; differentiable. VLPO reads its latent means and
      token logits off them without materialising [B, L, V] logits.
    teacher_layers: hidden-state indices the teacher tensors hold (a cached layer subset); the
      alignment then compares those layers of the student only. None = all layers.
    checkpoint: gradient-checkpoint every decoder layer, keeping the KV cache across the
      recompute (`monet_fast.model.cache_checkpoint`); None = whenever transformers' gradient
      checkpointing was enabled on the model. Only acts in training mode with grad enabled.
    """
    from .unwrap import unwrap

    model = unwrap(model)  # a peft wrapper: its base model runs with the adapters
    stage = stage or batch.stage
    seq.check_stage(stage)
    cfg = loss_config or LossConfig()
    device = model.device
    layouts = batch.layouts
    bsz = len(layouts)
    _check_blocks(batch, batch.latent_size)
    if teacher is not None and len(teacher) != bsz:
        raise ValueError(f"teacher has {len(teacher)} entries for a batch of {bsz} samples")

    arch = arch_of(model)
    aligned = align_layout(layouts)
    visual = embed_visual(model, batch)
    embeds = _scatter_rows(visual.embeds, aligned)
    deepstack = (
        None if visual.deepstack is None else visual.deepstack.relayout(aligned.col, aligned.length)
    )
    positions = torch.stack([_scatter_rows(batch.position_ids[a], aligned) for a in range(3)]).to(
        device
    )
    mrows = batch.masked_rows if stage == "stage2" else None
    if mrows is not None:
        mrows = _remap_rows(mrows, aligned)
    lm = arch.language_model(model)
    if getattr(lm.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        # Fast path: the Triton kernel reads the compact description; padding columns come
        # from the 2-D validity mask. No L x L tensor is built.
        valid = aligned.valid.to(device, torch.long)
        mrows = None if mrows is None else mrows.to(device)

        def attention_kwargs(c0: int, c1: int) -> dict:
            return {"attention_mask": valid[:, :c1], "masked_rows": mrows}

    else:
        mask = _dense_float_mask(mrows, aligned.valid, embeds.dtype).to(device)

        def attention_kwargs(c0: int, c1: int) -> dict:
            return {"attention_mask": mask[:, :, c0:c1, :c1]}

    # Which new columns need all-layer states: observation positions (stage-2 alignment and
    # teacher targets) and latent slots (stage-3 alignment and targets).
    want_obs = return_states or (stage == "stage2" and teacher is not None)
    want_slots = return_states or (stage == "stage3" and teacher is not None)
    state_cols: set[int] = set()
    for b, lay in enumerate(layouts):
        if want_obs:
            state_cols.update(aligned.col[b][lay.observation_positions].tolist())
        if want_slots:
            state_cols.update(aligned.col[b][lay.slot_positions].tolist())
    state_index = {c: i for i, c in enumerate(sorted(state_cols))}
    state_chunks: list[tuple[torch.Tensor, ...]] = []

    cache = DynamicCache(config=lm.config)
    # latent.feedback_norm, target read once; replayed latents (override) were recorded after
    # the rule, so a forward given `latents` never applies it and skips reading the table.
    feedback = FeedbackNorm.for_model(model) if latents is None else None
    cache_kw = cache_kwarg(lm)
    gate_state = {"closed": False}
    step_inputs: list[torch.Tensor] = []  # gated latent inputs, one [B, H] per slot step
    slot_rows: list[torch.Tensor] = []  # which samples have a real slot at that step
    hidden_chunks: list[torch.Tensor] = []
    last = None
    override = None
    if latents is not None:
        if len(latents) != bsz:
            raise ValueError(f"latents has {len(latents)} entries for a batch of {bsz} samples")
        override = embeds.new_zeros(embeds.shape)
        for b, lay in enumerate(layouts):
            n = len(lay.slot_positions)
            if tuple(latents[b].shape) != (n, embeds.shape[-1]):
                raise ValueError(
                    f"sample {batch.keys[b]}: latents must be [{n}, {embeds.shape[-1]}], "
                    f"got {tuple(latents[b].shape)}"
                )
            override[b, aligned.col[b][lay.slot_positions].to(device)] = latents[b].to(
                device, embeds.dtype
            )
    if checkpoint is None:
        checkpoint = checkpointing_requested(lm.layers)
    with cache_safe_checkpointing(lm.layers, cache, cache_kw, enabled=checkpoint):
        for chunk in aligned.chunks:
            if chunk[0] == "text":
                c0, c1 = chunk[1], chunk[2]
                x = embeds[:, c0:c1]
            else:
                c0 = chunk[1]
                c1 = c0 + 1
                has = aligned.valid[:, c0].to(device)
                # Replayed latents (override) were recorded after the feedback rule.
                fed = feedback(last[:, -1]) if override is None else override[:, c0]
                fed = LatentGate.apply(fed, gate_state)
                step_inputs.append(fed)
                slot_rows.append(has)
                x = torch.where(has.view(-1, 1), fed, embeds[:, c0]).unsqueeze(1)
            need = [c for c in range(c0, c1) if c in state_index]
            out = lm(
                inputs_embeds=x,
                position_ids=positions[:, :, c0:c1],
                **attention_kwargs(c0, c1),
                **{cache_kw: cache},
                **arch.lm_kwargs(None if deepstack is None else deepstack.columns(c0, c1)),
                use_cache=True,
                output_hidden_states=bool(need),
            )
            last = out.last_hidden_state
            hidden_chunks.append(last)
            if need:
                local = torch.tensor([c - c0 for c in need], device=device)
                state_chunks.append(tuple(h.index_select(1, local) for h in out.hidden_states))

    hidden = torch.cat(hidden_chunks, dim=1)  # [B, L', H], post-norm

    # Latents per sample, in slot order.
    fed_cols = {c: i for i, c in enumerate(aligned.slot_cols)}
    per_sample_latents = []
    for b, lay in enumerate(layouts):
        cols = aligned.col[b][lay.slot_positions].tolist()
        per_sample_latents.append(
            torch.stack([step_inputs[fed_cols[c]][b] for c in cols])
            if cols
            else embeds.new_zeros(0, embeds.shape[-1])
        )

    # CE: the logit at original position t-1 predicts labels[t].
    labels = batch.labels
    obs_mask = batch.observation_mask
    obs_w = cfg.obs_weight_for(stage)
    rows_b, rows_c, targets, weights = [], [], [], []
    for b in range(bsz):
        t = (labels[b] != seq.IGNORE_INDEX).nonzero().flatten()
        t = t[t > 0]
        rows_b.append(torch.full_like(t, b))
        rows_c.append(aligned.col[b][t - 1])
        targets.append(labels[b, t])
        weights.append(torch.where(obs_mask[b, t], obs_w, 1.0))
    rows_b, rows_c = torch.cat(rows_b).to(device), torch.cat(rows_c).to(device)
    ce_sum, ce_weight = head_weighted_ce_sum(
        model.lm_head,
        hidden[rows_b, rows_c],
        torch.cat(targets).to(device),
        torch.cat(weights).to(device),
        cfg.ce_chunk_size,
    )
    ce_loss = ce_sum / ce_weight.clamp_min(1.0)

    # All-layer states per sample at the requested positions.
    def gather_states(positions_of) -> list[torch.Tensor]:
        if not state_chunks:
            return [None] * bsz
        layers = [
            torch.cat([ch[i] for ch in state_chunks], dim=1) for i in range(len(state_chunks[0]))
        ]
        stacked = torch.stack(layers)  # [n_layers+1, B, n_cols, H]
        out = []
        for b, lay in enumerate(layouts):
            idx = [state_index[c] for c in aligned.col[b][positions_of(lay)].tolist()]
            out.append(stacked[:, b, idx])
        return out

    obs_states = gather_states(lambda lay: lay.observation_positions) if want_obs else None
    slot_states = gather_states(lambda lay: lay.slot_positions) if want_slots else None

    student = obs_states if stage == "stage2" else slot_states
    if student is not None and teacher_layers is not None:
        student = [st[list(teacher_layers)] for st in student]
    loss, align_loss, align_sum, align_count = stage_loss(
        stage, ce_loss, student, teacher, cfg, step_inputs, gate_state, batch.keys
    )

    hidden_out = None
    if return_hidden or return_logits:
        # Back to the batch's own coordinates (zero at padding).
        hidden_out = torch.stack(
            [
                hidden[b]
                .new_zeros(layouts[b].length, hidden.shape[-1])
                .index_copy(
                    0,
                    (aligned.col[b] >= 0).nonzero().flatten().to(device),
                    hidden[b, aligned.col[b][aligned.col[b] >= 0].to(device)],
                )
                for b in range(bsz)
            ]
        )
    logits = model.lm_head(hidden_out) if return_logits else None
    if not return_hidden:
        hidden_out = None
    return LatentForwardOutput(
        latents=per_sample_latents,
        loss=loss,
        ce_loss=ce_loss,
        align_loss=align_loss,
        ce_sum=ce_sum,
        ce_weight=ce_weight,
        align_sum=align_sum,
        align_count=align_count,
        n_target_tokens=int(rows_b.numel()),
        obs_states=obs_states,
        slot_states=slot_states,
        logits=logits,
        hidden=hidden_out,
    )
