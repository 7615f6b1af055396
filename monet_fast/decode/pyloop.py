"""The Python step loop: latent decoding the way the reference runner does it (baseline).

Per step: one batched forward over transformers' DynamicCache (masks built by transformers from
a growing 2-D attention mask), then a host sync to read the sampled ids, then a Python
`if`/`else` per request to update its latent state and decide which rows get a fed-back hidden
state (`index_copy_` of the pending vectors, as the vLLM runner patch does). Same rule, same
outputs as the engine (`engine.py`); it exists as the "Python step loop" of
`monet-fast bench latent-decode` and as a second implementation the tests compare against.
Greedy and sampling use `sampling.sample_tokens`; no CUDA graphs, no stop strings.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from monet_fast._compat import cache_kwarg
from monet_fast.decode.config import NO_BLOCK_CAP, resolve_config
from monet_fast.decode.engine import GenerateOutput, LogitsProcessor
from monet_fast.decode.inputs import prepare_batch
from monet_fast.decode.sampling import sample_tokens
from monet_fast.model.arch import arch_of
from monet_fast.model.feedback import FeedbackNorm


class _Request:
    """Per-request latent state, kept in Python (the reference keeps a dict per request)."""

    def __init__(self, budget: int) -> None:
        self.active = False  # inside a latent block
        self.left = 0  # sft: slots still to feed back
        self.current_len = 0  # monet_vllm: rows overwritten in this block
        self.pending: torch.Tensor | None = None  # hidden state to feed back next step
        self.blocks = 0
        self.budget = budget
        self.done = False
        self.emitted: list[int] = []
        self.latents: list[tuple[int, torch.Tensor]] = []  # (emission index, vector)


def generate_python_loop(
    model,
    processor,
    inputs: list,
    *,
    max_new_tokens: int,
    logits_processor: LogitsProcessor | None = None,
    **options,
) -> GenerateOutput:
    """Same interface and results as `monet_fast.decode.generate` (minus stop strings/graphs)."""
    cfg = resolve_config(model, processor, max_new_tokens=max_new_tokens, **options)
    batch = prepare_batch(processor, inputs)
    device = model.device
    arch = arch_of(model)  # base-model specifics (monet_fast.model.arch)
    lm, embed = arch.language_model(model), arch.input_embeddings(model)
    n_rows = batch.batch_size
    offsets = [1 if f else 0 for f in batch.forced_start]
    reqs = [_Request(cfg.max_new_tokens + off) for off in offsets]
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    temperature = torch.tensor(cfg.temperature, device=device)
    top_p = torch.tensor(cfg.top_p, device=device) if cfg.top_p < 1.0 else None
    eos = set(cfg.eos_ids)
    cache_kw = cache_kwarg(lm)

    with torch.no_grad():
        cache = DynamicCache(config=model.config.get_text_config())
        feedback = FeedbackNorm.for_model(model)
        positions = arch.rope_index(
            batch.input_ids,
            batch.mm_token_type_ids,
            batch.image_grid_thw,
            batch.attention_mask,
            spatial_merge_size=arch.spatial_merge_size(model),
        ).to(device)
        mask = batch.attention_mask.to(device)
        visual = arch.embed(model, batch.input_ids, batch.pixel_values, batch.image_grid_thw)
        out = lm(
            inputs_embeds=visual.embeds,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **{cache_kw: cache},
            **arch.lm_kwargs(visual.deepstack),
        )
        hidden = out.last_hidden_state[:, -1]
        next_pos = positions.amax(dim=(0, 2)) + 1  # [B]
        step = 0
        while True:
            logits = model.lm_head(hidden).float()
            if cfg.max_blocks != NO_BLOCK_CAP:
                for b, r in enumerate(reqs):
                    if not r.active and r.blocks >= cfg.max_blocks:
                        logits[b, cfg.start_id] = float("-inf")
            if logits_processor is not None:
                index = torch.tensor([step - off for off in offsets], device=device)
                logits = logits_processor(logits, index)
            sampled = sample_tokens(logits, cfg.do_sample, temperature, top_p, generator)
            tokens = sampled.tolist()  # host sync every step
            next_ids = []
            fed = feedback(hidden)  # latent.feedback_norm (identity for "none")
            for b, r in enumerate(reqs):
                tok = cfg.start_id if (step == 0 and offsets[b]) else tokens[b]
                next_ids.append(_advance(r, tok, fed[b], step, cfg, eos))
            step += 1
            if all(r.done for r in reqs):
                break
            # Next inputs: token embeddings, then the pending hidden states copied over them.
            row_embeds = embed(torch.tensor(next_ids, device=device))
            rows = [b for b, r in enumerate(reqs) if r.pending is not None]
            if rows:
                pend = torch.stack([reqs[b].pending for b in rows])
                row_embeds.index_copy_(0, torch.tensor(rows, device=device), pend)
                for b in rows:
                    reqs[b].pending = None
            mask = torch.cat([mask, mask.new_ones(n_rows, 1)], dim=1)
            pos = next_pos.view(1, n_rows, 1).expand(3, n_rows, 1)
            next_pos = next_pos + 1
            out = lm(
                inputs_embeds=row_embeds.unsqueeze(1),
                position_ids=pos,
                attention_mask=mask,
                use_cache=True,
                **{cache_kw: cache},
            )
            hidden = out.last_hidden_state[:, -1]

    return _collect(
        reqs, offsets, cfg, processor.tokenizer, embed.weight.shape[1], embed.weight.dtype
    )


def _advance(r: _Request, tok: int, h: torch.Tensor, step: int, cfg, eos: set[int]) -> int:
    """Apply one sampled token to a request; returns the id fed next (and emitted)."""
    if r.done:
        return cfg.fill_id
    emit = tok
    if cfg.layout == "sft":
        if r.active:
            if r.left > 0:
                emit, r.pending = cfg.slot_id, h
                r.left -= 1
            else:
                emit, r.active = cfg.end_id, False
        elif tok == cfg.start_id and r.blocks < cfg.max_blocks:
            r.active, r.left = True, cfg.latent_size
            r.blocks += 1
        elif tok in eos:
            r.done = True
    else:  # monet_vllm, in the reference runner's order
        if not r.active and tok == cfg.start_id and r.blocks < cfg.max_blocks:
            r.active, r.current_len = True, 0
            r.blocks += 1
        elif r.active and (tok == cfg.end_id or r.current_len >= cfg.latent_size):
            r.active, r.current_len, emit = False, 0, cfg.end_id
        elif r.active and tok in eos:
            r.done = True
        elif r.active:
            emit = cfg.slot_id
        elif tok in eos:
            r.done = True
        if r.active and not r.done:
            r.pending = h
            r.current_len += 1
    if r.pending is not None:
        r.latents.append((step, h))
    r.emitted.append(emit)
    if len(r.emitted) >= r.budget:
        r.done = True
    return emit


def _collect(reqs, offsets, cfg, tokenizer, hidden_size: int, dtype) -> GenerateOutput:
    sequences, texts, reasons, latents, counts = [], [], [], [], []
    for r, off in zip(reqs, offsets):
        out = r.emitted[off:]
        reason = "eos" if out and out[-1] in cfg.eos_ids else "length"
        sequences.append(torch.tensor(out, dtype=torch.long))
        texts.append(
            tokenizer.decode(out[:-1] if reason == "eos" else out, skip_special_tokens=False)
        )
        reasons.append(reason)
        blocks: list[list[torch.Tensor]] = []
        prev = None
        for i, v in r.latents:
            if prev is None or i != prev + 1:
                blocks.append([])
            blocks[-1].append(v)
            prev = i
        t = torch.zeros(len(blocks), cfg.latent_size, hidden_size, dtype=dtype)
        for j, block in enumerate(blocks):
            t[j, : len(block)] = torch.stack(block).cpu()
        latents.append(t)
        counts.append([len(b) for b in blocks])
    return GenerateOutput(
        sequences=sequences,
        texts=texts,
        latents=latents if cfg.return_latents else None,
        latent_counts=counts if cfg.return_latents else None,
        finish_reasons=reasons,
    )
