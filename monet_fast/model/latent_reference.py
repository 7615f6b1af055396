"""The reference's two-pass latent forward, kept as an oracle for tests and a benchmark baseline.

As in NOVAglow646/Monet (`CustomTrainerSFT_STAGE2.compute_loss` + the latent branch of its
`Qwen2_5_VLModel.forward`, REFERENCE.md §3.4): per sample, pass 1 walks the sequence with a KV
cache and computes each latent slot from the hidden state before it (one model call per slot);
pass 2 runs the full sequence again with the recorded latents inserted and computes the losses.

Options:
  mask_mode="reference": pass 1 runs image tails and latent steps with plain causal attention
    (latents see every aux image, image pads see each other), pass 2 uses the stage-2 mask —
    what the reference does. "consistent": the stage-2 mask everywhere (our batched semantics).
  detach_latent_inputs=True: pass-1 latent steps take `latent.detach()` as input, as the
    reference does; False keeps the chain (our batched semantics).
With mask_mode="consistent" and detach_latent_inputs=False this computes exactly what
`latent_forward` computes — values and gradients — with many more model calls.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from monet_fast._compat import cache_kwarg
from monet_fast.data.latent_batch import LatentBatch
from monet_fast.model import sequence as seq
from monet_fast.model.arch import arch_of
from monet_fast.model.latent import LatentForwardOutput, embed_visual
from monet_fast.model.losses import LatentGate, LossConfig, stage_loss, weighted_ce_sum

MASK_MODES = ("reference", "consistent")


def _float_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


def _step(
    lm, cache, pos, s: int, e: int, allowed: torch.Tensor, inp: torch.Tensor, visual: dict
) -> torch.Tensor:
    """Run positions [s, e) over the cache with rows [s, e) of the `allowed` mask.

    visual: the sample's (arch, deepstack) to pass the columns' per-layer visual features."""
    arch, deepstack = visual["arch"], visual["deepstack"]
    out = lm(
        inputs_embeds=inp,
        position_ids=pos[:, :, s:e],
        attention_mask=_float_mask(allowed[:, :, s:e, :e], inp.dtype).to(inp.device),
        **{cache_kwarg(lm): cache},
        **arch.lm_kwargs(None if deepstack is None else deepstack.columns(s, e)),
        use_cache=True,
    )
    return out.last_hidden_state


def reference_latent_forward(
    model,
    batch: LatentBatch,
    stage: str | None = None,
    teacher: list[torch.Tensor] | None = None,
    *,
    loss_config: LossConfig | None = None,
    mask_mode: str = "reference",
    detach_latent_inputs: bool = True,
) -> LatentForwardOutput:
    """Per-sample, per-latent loop + second full forward; same outputs as `latent_forward`."""
    stage = stage or batch.stage
    seq.check_stage(stage)
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    cfg = loss_config or LossConfig()
    device = model.device
    arch = arch_of(model)
    lm = arch.language_model(model)
    layouts = batch.layouts
    visual_all = embed_visual(model, batch)
    embeds_all = visual_all.embeds
    dtype = embeds_all.dtype
    gate_state = {"closed": False}
    obs_w = cfg.obs_weight_for(stage)

    latents, gated, obs_states, slot_states = [], [], [], []
    ce_sum = embeds_all.new_zeros((), dtype=torch.float32)
    ce_weight = ce_sum.clone()
    n_targets = 0
    for b, lay in enumerate(layouts):
        lo, hi = lay.valid
        n = hi - lo
        x = embeds_all[b : b + 1, lo:hi]
        ds = visual_all.deepstack
        visual = {
            "arch": arch,
            "deepstack": None if ds is None else ds.rows(b, b + 1).columns(lo, hi),
        }
        pos = batch.position_ids[:, b : b + 1, lo:hi].to(device)
        causal = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
        if stage == "stage2" and batch.masked_rows is not None:
            rows = batch.masked_rows[b : b + 1, lo:hi].clone()
            rows = (rows - lo).clamp(min=0)  # row indices relative to the trimmed sequence
            staged = seq.allowed_mask(rows, n)
        else:
            staged = causal
        slots = [p - lo for p in lay.slot_positions]

        # Pass 1: latents, one slot at a time.
        vecs = []
        if slots:
            cache = DynamicCache(config=lm.config)
            prev, h_last = 0, None
            tails = {blk.slots[0] - lo: blk.aux_image for blk in lay.latent_blocks}

            for p in slots:
                if p > prev:
                    cut = p
                    img = tails.get(p)
                    if mask_mode == "reference" and img is not None and img[0] - lo >= prev:
                        cut = img[0] - lo  # image tail [cut, p) runs plain causal
                    if cut > prev:
                        h_last = _step(lm, cache, pos, prev, cut, staged, x[:, prev:cut], visual)
                    if p > cut:
                        h_last = _step(lm, cache, pos, cut, p, causal, x[:, cut:p], visual)
                v = h_last[:, -1]
                vecs.append(v[0])
                inp = v.detach() if detach_latent_inputs else v
                step_mask = causal if mask_mode == "reference" else staged
                h_last = _step(lm, cache, pos, p, p + 1, step_mask, inp.unsqueeze(1), visual)
                prev = p + 1

        # Pass 2: the full sequence with the latents inserted.
        if vecs:
            gv = [LatentGate.apply(v, gate_state) for v in vecs]
            gated += gv
            idx = torch.tensor(slots, device=device)
            x = x.index_put((torch.zeros_like(idx), idx), torch.stack(gv).to(dtype))
        out = lm(
            inputs_embeds=x,
            position_ids=pos,
            attention_mask=_float_mask(staged, dtype).to(device),
            use_cache=False,
            output_hidden_states=True,
            **arch.lm_kwargs(visual["deepstack"]),
        )
        hidden = out.last_hidden_state[0]
        states = torch.stack(out.hidden_states)[:, 0]  # [n_layers+1, n, H]
        obs_states.append(states[:, [p - lo for p in lay.observation_positions]])
        slot_states.append(states[:, slots])
        latents.append(torch.stack(vecs) if vecs else x.new_zeros(0, x.shape[-1]))

        labels = batch.labels[b]
        t = (labels != seq.IGNORE_INDEX).nonzero().flatten()
        t = t[t > lo]
        w = torch.where(batch.observation_mask[b, t], obs_w, 1.0).to(device)
        s, wsum = weighted_ce_sum(
            model.lm_head(hidden[(t - 1 - lo).to(device)]), labels[t].to(device), w
        )
        ce_sum, ce_weight = ce_sum + s, ce_weight + wsum
        n_targets += int(t.numel())

    ce_loss = ce_sum / ce_weight.clamp_min(1.0)
    loss, align_loss, align_sum, align_count = stage_loss(
        stage,
        ce_loss,
        obs_states if stage == "stage2" else slot_states,
        teacher,
        cfg,
        gated,
        gate_state,
        batch.keys,
    )
    return LatentForwardOutput(
        latents=latents,
        loss=loss,
        ce_loss=ce_loss,
        align_loss=align_loss,
        ce_sum=ce_sum,
        ce_weight=ce_weight,
        align_sum=align_sum,
        align_count=align_count,
        n_target_tokens=n_targets,
        obs_states=obs_states,
        slot_states=slot_states,
    )
