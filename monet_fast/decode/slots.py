"""Slot decoding: the engine's decode step with per-row state, for continuous batching.

`generate()` decodes one fixed batch: every row shares one prefill, one step counter and one
cache write column. A server needs rows that start and stop at different times, so here every
row of a static batch (a *slot*) has its own cache write position, emission counter, sampling
parameters (temperature, top-p, greedy or not, logit bias), random generator and latent settings
(K, block cap). Requests are prefilled into free slots between two decode steps while the other
slots keep their state (several at once in one right-padded forward, `prefill_many`); a finished
or cancelled request frees its slot for the next one.

Same math per row as the engine: `LatentDecoder.text_forward` on a static KV cache, the LM head,
the exponential-race sampler of `sampling.sample_tokens` and the C++/CUDA `_ops.latent_step`, so a
greedy request decodes exactly what `generate()` decodes for it alone. Each slot owns a
`torch.Generator`, reseeded when a request joins, and a row draws its noise only from it: a
seeded request's samples do not depend on the other rows.

Per-row K and block cap around the scalar `latent_step`: START is masked out of the logits of a
row at its cap (as the engine does for `max_latent_blocks`); sft rows that just opened a block
get their own K as countdown; monet_vllm rows whose block holds K rows get END as their sampled
id, which is the close rule of that layout.

The decode step touches only the static buffers of `SlotBuffers` and never syncs with the host in
`full` mode (the whole cache is attended, masked), so on CUDA it is captured once in a CUDA graph
with every slot generator registered and replayed; on CPU it runs eagerly over the columns in
use.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from monet_fast import _ops
from monet_fast.decode.config import NO_BLOCK_CAP, saved_latent_config
from monet_fast.decode.engine import LatentDecoder
from monet_fast.decode.inputs import PreparedBatch
from monet_fast.decode.sampling import top_p_filter
from monet_fast.decode.slot_batch import join_right_padded
from monet_fast.model.feedback import FeedbackNorm

# latent_step's own K for monet_vllm rows: never reached, each row's K closes its blocks instead.
_VLLM_K_CAP = 2**30


@dataclass(frozen=True)
class SlotParams:
    """Decoding settings of one request (validated by the caller)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    latent_size: int | None = None  # None: the model's K
    max_blocks: int = NO_BLOCK_CAP  # 0 bans START ("off")
    force_latent: bool = False  # the first emission is START ("force")
    logit_bias: tuple[tuple[int, float], ...] = ()


class SlotKVCache:
    """Keys/values [slots, kv_heads, max_len, head_dim] per layer with a write column per slot.

    Duck-types `Cache.update` like `state.StaticKVCache`. Two modes: `prefill_rows = [(s, L),
    ...]` writes row b of a right-padded prompt batch to columns [0, L) of slot s and returns the
    batch's keys (the prompts attend to themselves only); otherwise one column per row at `write_pos[row]`, returning the first
    `view_len` columns (eager) or all (`view_len=None`, the mask hides the rest).
    """

    is_compileable = True

    def __init__(self, n_layers, slots, kv_heads, head_dim, max_len, dtype, device) -> None:
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.write_pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.prefill_rows: list[tuple[int, int]] | None = None
        self.view_len: int | None = None
        self.rows: int | None = None  # decode only the first `rows` slots (eager); None: all
        self._index = self.write_pos.view(slots, 1, 1, 1).expand(slots, kv_heads, 1, head_dim)

    def __len__(self) -> int:
        return len(self.keys)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_rows is not None:
            # Right padding: row b's real keys are its first L columns; the rest never land.
            for b, (s, length) in enumerate(self.prefill_rows):
                keys[s, :, :length].copy_(key_states[b, :, :length])
                values[s, :, :length].copy_(value_states[b, :, :length])
            return key_states, value_states
        index = self._index
        if self.rows is not None:
            keys, values, index = keys[: self.rows], values[: self.rows], index[: self.rows]
        # scatter_ with a device index: each row writes its own column, no host value needed.
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index, value_states)
        if self.view_len is not None:
            return keys[:, :, : self.view_len], values[:, :, : self.view_len]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # position ids are always passed


class SlotBuffers:
    """Every tensor the slot step touches, at fixed addresses (see `state.DecodeBuffers`).

    Per slot: mask [S,1,1,L], next_embeds [S,H], base_pos/step [S] (position of emission 0, index
    of the last emission), mode/count/n_blocks/remaining [S] int32 (latent_step state),
    emit_ids/use_hidden [S], out_ids/out_fed [S,L] by emission index, ring [S,R,H] the fed-back
    vectors of the last R emissions, and the sampling/latent parameters.
    """

    def __init__(self, model, slots: int, max_len: int, eos_ids, ring: int) -> None:
        text_cfg = model.config.get_text_config()
        device = model.device
        dtype = model.get_input_embeddings().weight.dtype
        hidden = text_cfg.hidden_size
        head_dim = getattr(text_cfg, "head_dim", None) or hidden // text_cfg.num_attention_heads
        vocab = model.lm_head.weight.shape[0]
        self.slots, self.max_len, self.ring_len = slots, max_len, ring
        self.cache = SlotKVCache(
            text_cfg.num_hidden_layers,
            slots,
            text_cfg.num_key_value_heads,
            head_dim,
            max_len,
            dtype,
            device,
        )

        def full(shape, value, dt):
            return torch.full(shape, value, dtype=dt, device=device)

        self.min_value = torch.finfo(dtype).min
        self.mask = full((slots, 1, 1, max_len), self.min_value, dtype)
        self.next_embeds = full((slots, hidden), 0, dtype)
        self.base_pos = full((slots,), 0, torch.long)
        self.step = full((slots,), 0, torch.long)
        self.mode = full((slots,), _ops.MODE_DONE, torch.int32)
        self.count = full((slots,), 0, torch.int32)
        self.n_blocks = full((slots,), 0, torch.int32)
        self.remaining = full((slots,), 0, torch.int32)
        self.emit_ids = full((slots,), 0, torch.long)
        self.use_hidden = full((slots,), False, torch.bool)
        self.out_ids = full((slots, max_len), 0, torch.long)
        self.out_fed = full((slots, max_len), False, torch.bool)
        self.ring = full((slots, ring, hidden), 0, dtype)
        self.temperature = full((slots,), 1.0, torch.float32)
        self.top_p = full((slots,), 1.0, torch.float32)
        self.do_sample = full((slots,), False, torch.bool)
        self.latent_k = full((slots,), 1, torch.int32)
        self.max_blocks = full((slots,), NO_BLOCK_CAP, torch.int32)
        self.bias = full((slots, vocab), 0.0, torch.float32)
        self.eos_ids = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
        self.generators = [torch.Generator(device=device) for _ in range(slots)]


class SlotDecoder:
    """Prefill requests into slots and run decode steps over all slots (see the module doc)."""

    def __init__(
        self,
        model,
        processor,
        slots: int,
        max_len: int,
        eos_ids,
        fill_id: int,
        ring: int = 16,
        use_cuda_graphs: bool = True,
        emulate_graphs: bool = False,
    ) -> None:
        """use_cuda_graphs: on CUDA, capture the step once and replay it. emulate_graphs: take
        that path on CPU (full-cache step run eagerly, checked once for host syncs) for tests."""
        self.model = model
        self.engine = LatentDecoder(model, processor)
        self.bufs = SlotBuffers(model, slots, max_len, eos_ids, ring)
        saved = saved_latent_config(model, processor)
        self.latent = saved
        self.layout_id = _ops.LAYOUT_IDS[saved.latent_layout]
        # What a latent step feeds back (latent.feedback_norm), read once: served weights are fixed.
        self.feedback = FeedbackNorm.for_model(model)
        self.fill_id = int(fill_id)
        self.eos_ids = tuple(int(e) for e in eos_ids)
        # Host knowledge, for eager decoding only: a bound on each occupied slot's write column
        # (the attention then scans only the columns in use) and which slots sample.
        self._bound = [0] * slots
        self._occupied = [False] * slots
        self._sampling = [False] * slots
        self.graph = None
        self._n = slots  # slots the current decode step runs
        if emulate_graphs or (use_cuda_graphs and model.device.type == "cuda"):
            # Captured now, while every slot is free: the capture's warm-up steps then touch
            # nothing a request will read (prefill resets a slot's state when it joins).
            with torch.inference_mode():  # as every later step: no autograd records
                self.graph = self._capture(emulate_graphs)

    # ------------------------------------------------------------------ host API

    def check(self, batch: PreparedBatch, params: SlotParams) -> None:
        """Raise ValueError unless the one-row prompt `batch` + its budget fits a slot."""
        prompt_len = batch.input_ids.shape[1]
        budget = params.max_new_tokens + int(params.force_latent or batch.forced_start[0])
        if prompt_len + budget > self.bufs.max_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({budget}) exceeds the "
                f"{self.bufs.max_len}-token context"
            )

    def prefill(self, slot: int, batch: PreparedBatch, params: SlotParams) -> None:
        """Run the one-row prompt `batch` into `slot`, reset its state and make emission 0."""
        self.prefill_many([(slot, batch, params)])

    def prefill_many(self, items: list[tuple[int, PreparedBatch, SlotParams]]) -> None:
        """Prefill several (slot, one-row prompt, params) in one right-padded forward.

        Each row's keys land in columns [0, L) of its slot and its emission 0 comes from its
        last real token, so every request decodes as if it had been prefilled alone.
        """
        bufs, model = self.bufs, self.model
        device = model.device
        slots = [s for s, _, _ in items]
        if len(set(slots)) != len(slots):
            raise ValueError(f"prefill_many: a slot appears twice in {slots}")
        for _, batch, params in items:
            self.check(batch, params)
        pad_id = self.engine.processor.tokenizer.pad_token_id
        batch, lengths = join_right_padded(
            [b for _, b, _ in items], self.fill_id if pad_id is None else pad_id
        )
        visual, positions, mask, _ = self.engine.prompt_inputs(batch, bufs.mask.dtype)
        cache = bufs.cache
        cache.prefill_rows = list(zip(slots, lengths))
        try:
            states = self.engine.text_forward(
                visual.embeds, positions, mask, cache, visual.deepstack
            )
        finally:
            cache.prefill_rows = None

        forced = []
        for b, (s, one, params) in enumerate(items):
            prompt_len = lengths[b]
            forced.append(bool(params.force_latent or one.forced_start[0]))
            # Everything the previous occupant left is reset: mask (its columns closed again),
            # counters, parameters, generator.
            bufs.mask[s].fill_(bufs.min_value)
            bufs.mask[s, 0, 0, :prompt_len] = 0.0
            bufs.base_pos[s] = positions[:, b, :prompt_len].amax() + 1
            bufs.step[s] = 0
            cache.write_pos[s] = prompt_len
            bufs.mode[s] = _ops.MODE_TEXT
            bufs.count[s] = 0
            bufs.n_blocks[s] = 0
            bufs.remaining[s] = params.max_new_tokens + int(forced[-1])
            bufs.temperature[s] = params.temperature
            bufs.top_p[s] = params.top_p
            bufs.do_sample[s] = params.do_sample
            k = params.latent_size if params.latent_size is not None else self.latent.latent_size
            bufs.latent_k[s] = k
            bufs.max_blocks[s] = params.max_blocks
            bufs.bias[s].zero_()
            for token, value in params.logit_bias:
                bufs.bias[s, token] = value
            bufs.generators[s].manual_seed(params.seed)
            self._occupied[s] = True
            self._sampling[s] = params.do_sample
            self._bound[s] = prompt_len

        rows = torch.tensor(slots, device=device)
        last = torch.tensor(lengths, device=device) - 1  # right padding: each row's last token
        hidden = states[torch.arange(len(items), device=device), last]
        force = torch.tensor(forced, dtype=torch.bool, device=device)
        self._select(rows, hidden, live=None, force=force)

    def release(self, slot: int) -> None:
        """Free `slot` (finished, stopped or cancelled): it stops decoding at once."""
        self.bufs.mode[slot] = _ops.MODE_DONE
        self.bufs.mask[slot].fill_(self.bufs.min_value)
        self._occupied[slot] = False
        self._sampling[slot] = False

    def decode_steps(self, n: int) -> None:
        """Run `n` decode steps over every slot: graph replays, or eager steps over the cache
        columns in use."""
        if self.graph is not None:
            for _ in range(n):
                self.graph.replay()
            return
        for _ in range(n):
            for s in range(self.bufs.slots):
                if self._occupied[s]:
                    self._bound[s] += 1
            view_len = min(self.bufs.max_len, max(self._bound) + 1)
            # Slots are taken lowest first: rows past the last occupied one need no forward.
            rows = max(s for s in range(self.bufs.slots) if self._occupied[s]) + 1
            self.step(view_len, rows)

    def _capture(self, emulate: bool):
        """The full-cache step as a CUDA graph with every slot generator registered (each
        replay advances each generator's offset), or its CPU stand-in (`graphs.EagerStep`)."""
        from monet_fast.decode.graphs import EagerStep, capture_decode_step, weights_fingerprint

        def step() -> None:
            self.step(None)

        if emulate:
            return EagerStep(step, self.model.device, lambda: weights_fingerprint(self.model))
        if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            warnings.warn(
                "this torch cannot register generators with a CUDA graph: serving eagerly",
                stacklevel=3,
            )
            return None
        return capture_decode_step(step, self.bufs.generators)

    # ------------------------------------------------------------- device step

    def step(self, view_len: int | None, rows: int | None = None) -> None:
        """One decode step of the first `rows` slots (None: all); `view_len=None`: graph mode
        (full cache, no host sync)."""
        bufs = self.bufs
        n = bufs.slots if rows is None else rows
        self._n = n
        live = bufs.mode[:n] != _ops.MODE_DONE
        write_pos = bufs.cache.write_pos[:n]
        positions = (bufs.base_pos[:n] + bufs.step[:n]).view(1, n, 1).expand(3, n, 1)
        mask = bufs.mask[:n]
        mask.scatter_(3, write_pos.view(n, 1, 1, 1), 0.0)
        if view_len is not None:
            mask = mask[..., :view_len]
        bufs.cache.view_len, bufs.cache.rows = view_len, rows
        try:
            states = self.engine.text_forward(
                bufs.next_embeds[:n].unsqueeze(1), positions, mask, bufs.cache
            )
        finally:
            bufs.cache.rows = None
        advance = live.long()
        write_pos.add_(advance)
        bufs.step[:n].add_(advance)
        self._select(None, states[:, -1], live=live, force=None, graph=view_len is None)

    def _sample(self, rows, logits, graph: bool) -> torch.Tensor:
        """Per-row greedy or temperature + top-p sampling (sampling.sample_tokens, one row each)."""
        bufs = self.bufs
        slots = list(range(self._n)) if rows is None else rows.tolist()
        greedy = logits.argmax(dim=-1)
        if not graph and not any(self._sampling[s] for s in slots):
            return greedy
        pick = (lambda t: t[: self._n]) if rows is None else (lambda t: t[rows])
        scaled = logits / pick(bufs.temperature).view(-1, 1)
        probs = top_p_filter(scaled, pick(bufs.top_p).view(-1, 1)).softmax(dim=-1)
        race = torch.ones_like(probs)
        for j, s in enumerate(slots):
            # Each row draws from its own slot's generator only (batch-independent samples).
            if graph or self._sampling[s]:
                race[j].exponential_(1.0, generator=bufs.generators[s])
        sampled = (probs / race).argmax(dim=-1)
        return torch.where(pick(bufs.do_sample), sampled, greedy)

    def _select(self, rows, hidden, live, force, graph: bool = False) -> None:
        """LM head -> sampling -> latent_step for the rows `rows` (None: all, in place);
        `force`: None, or a bool per row whose emission is START whatever was sampled."""
        bufs, lat = self.bufs, self.latent
        # rows None: the decode step's first _n slots, as views (updated in place).
        pick = (lambda t: t[: self._n]) if rows is None else (lambda t: t[rows])
        logits = self.engine.lm_head(hidden).float() + pick(bufs.bias)
        hidden = self.feedback(hidden)  # as the engine's _select
        mode, count, n_blocks = pick(bufs.mode), pick(bufs.count), pick(bufs.n_blocks)
        capped = (n_blocks >= pick(bufs.max_blocks)) & (mode == _ops.MODE_TEXT)
        logits[:, lat.latent_start_id] = logits[:, lat.latent_start_id].masked_fill(
            capped, float("-inf")
        )
        sampled = self._sample(rows, logits, graph)
        if force is not None:
            sampled = sampled.masked_fill(force, lat.latent_start_id)
        k_rows = pick(bufs.latent_k)
        if self.layout_id == 1:  # monet_vllm: a block holding K rows closes now
            full_block = (mode == _ops.MODE_LATENT) & (count >= k_rows)
            sampled = torch.where(full_block, lat.latent_end_id, sampled)
            k_scalar = _VLLM_K_CAP
        else:
            k_scalar = lat.latent_size
        was_text = mode == _ops.MODE_TEXT
        remaining, emit = pick(bufs.remaining), pick(bufs.emit_ids)
        use_hidden, next_embeds = pick(bufs.use_hidden), pick(bufs.next_embeds)
        _ops.latent_step(
            sampled,
            hidden,
            self.engine.embed_weight,
            bufs.eos_ids,
            mode,
            count,
            n_blocks,
            remaining,
            emit,
            use_hidden,
            next_embeds,
            self.layout_id,
            k_scalar,
            lat.latent_start_id,
            lat.latent_end_id,
            lat.latent_token_id,
            self.fill_id,
            NO_BLOCK_CAP,  # caps are applied per row on the logits above
        )
        if self.layout_id == 0:  # sft: a block just opened counts down from the row's own K
            opened = was_text & (mode == _ops.MODE_LATENT)
            count.copy_(torch.where(opened, k_rows, count))
        step = pick(bufs.step).view(-1, 1)
        new_ids, new_fed = emit.view(-1, 1), use_hidden.view(-1, 1)
        slot_index = torch.remainder(step, bufs.ring_len).view(-1, 1, 1)
        slot_index = slot_index.expand(-1, 1, hidden.shape[-1])
        new_vec = hidden.to(bufs.ring.dtype).unsqueeze(1)
        if rows is None:
            # A finished row keeps its last emission (its step no longer advances).
            keep = live.view(-1, 1)
            out_ids, out_fed, ring = pick(bufs.out_ids), pick(bufs.out_fed), pick(bufs.ring)
            new_ids = torch.where(keep, new_ids, out_ids.gather(1, step))
            new_fed = torch.where(keep, new_fed, out_fed.gather(1, step))
            new_vec = torch.where(keep.view(-1, 1, 1), new_vec, ring.gather(1, slot_index))
            out_ids.scatter_(1, step, new_ids)
            out_fed.scatter_(1, step, new_fed)
            ring.scatter_(1, slot_index, new_vec)
            return
        # Prefill rows: write the picked copies back.
        for name, value in (
            ("mode", mode),
            ("count", count),
            ("n_blocks", n_blocks),
            ("remaining", remaining),
            ("emit_ids", emit),
            ("use_hidden", use_hidden),
            ("next_embeds", next_embeds),
        ):
            getattr(bufs, name)[rows] = value
        bufs.out_ids[rows, step.view(-1)] = new_ids.view(-1)
        bufs.out_fed[rows, step.view(-1)] = new_fed.view(-1)
        bufs.ring[rows, torch.remainder(step.view(-1), bufs.ring_len)] = new_vec.view(len(rows), -1)

    # ------------------------------------------------------------------- host

    def read(
        self, slot: int, first: int
    ) -> tuple[list[int], list[bool], dict[int, torch.Tensor], int, int]:
        """(new ids, new fed flags, {emission index: fed vector}, last emission index, mode) of
        `slot` from emission index `first` on."""
        bufs = self.bufs
        last = int(bufs.step[slot])
        mode = int(bufs.mode[slot])
        ids = bufs.out_ids[slot, first : last + 1].tolist()
        fed = bufs.out_fed[slot, first : last + 1].tolist()
        vectors = {}
        for i, f in enumerate(fed):
            if f:
                vectors[first + i] = bufs.ring[slot, (first + i) % bufs.ring_len].cpu()
        return ids, fed, vectors, last, mode
