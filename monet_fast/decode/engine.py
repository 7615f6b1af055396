"""Batched latent-feedback decoding on the stock transformers Qwen-VL models: `generate()`.

Every sequence of a batch independently alternates between text steps and latent steps. A text
step samples a token from the LM head; a latent step feeds the final post-RMSNorm hidden state of
the previous position back as the next input embedding (REFERENCE.md §7.1) and samples nothing
that matters. Two layouts (a saved config field, `monet_fast.model.config`):

  sft         `<abs_vis_token>` keeps its embedding; K slots take the hidden state of the
              position before them; then `</abs_vis_token>` is forced. Emitted:
              S, PAD x K, E. No LM head output is used inside the block.
  monet_vllm  the released Monet-7B's vLLM runner (REFERENCE.md §6, oracle 13): once START is
              sampled, START's own input row is the hidden state that predicted it, each following
              row the previous hidden state; when K rows were overwritten the next sampled token is
              replaced by END; a sampled END closes early. Emitted: S, PAD x (K-1), E (the
              sampled placeholders are recorded as PAD).

One decode step = model forward of one token per row on a static KV cache -> LM head -> sampling
-> `_ops.latent_step` (C++/CUDA: state machine + selection of the next input embedding). All state
is on the device; the host looks at it only every `check_every` steps (finished rows, stop
strings, streaming, draining the latent trace). On CUDA the step is captured once per batch
bucket in a CUDA graph and replayed (`graphs.py`); on CPU it runs eagerly. A logits processor is
captured with the step: it must follow the graph-safe contract (`graph_safety.py`), checked
before capture; one that does not is run eagerly (no graphs) with a warning. Captured graphs are
dropped when the weights change storage, dtype or device (`graphs.weights_fingerprint`).

Positions: a row's decoded tokens (text and latent alike) are ordinary text positions for mRoPE:
max prompt position + 1 + i on all three axes. Left padding stays masked by a per-row additive
mask that gains one visible column per step.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from monet_fast import _ops
from monet_fast._compat import cache_kwarg
from monet_fast.decode.config import (
    DEFAULT_CHECK_EVERY,
    NO_BLOCK_CAP,
    DecodeConfig,
    resolve_config,
)
from monet_fast.decode.graph_safety import (
    GraphUnsafeProcessorWarning,
    LogitsProcessor,
    check_logits_processor,
)
from monet_fast.decode.host import GenerateOutput, HostView, Streamer
from monet_fast.decode.inputs import PreparedBatch, prepare_batch
from monet_fast.decode.sampling import sample_tokens
from monet_fast.decode.state import DecodeBuffers
from monet_fast.model.arch import DeepstackFeatures, arch_of
from monet_fast.model.feedback import FeedbackNorm

# (vectors [B, H] about to be fed back, per-row index of the latent in the row's trace [B] int64)
# -> the vectors to feed instead (latent interventions; eager decoding only).
LatentTransform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _Intervention:
    """Per-call latent intervention state (eval's `monet_fast.eval.interventions`).

    transform: replaces each fed-back vector. hide: once a row's block has closed, its latent
    columns are masked from every later query (the slots inside a block still see each other).
    latent_cols: [B, S] bool, the cache columns that hold a fed-back latent, per row.
    """

    transform: LatentTransform | None = None
    hide: bool = False
    latent_cols: torch.Tensor | None = None


_GRAPH_LEN_MULTIPLE = 256


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def batch_bucket(batch: int) -> int:
    """Batch size a CUDA graph is captured for: powers of two up to 256, then multiples of 64."""
    for size in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        if batch <= size:
            return size
    return _round_up(batch, 64)


@dataclass
class _Runner:
    """Buffers (and, on CUDA, a captured step) for one bucket configuration."""

    bufs: DecodeBuffers
    generator: torch.Generator | None
    graph: object | None = None


class LatentDecoder:
    """The decoding engine for one model: holds the step function and its captured graphs.

    `generate()` keeps one decoder per model, so CUDA graphs are captured once per batch bucket
    and configuration and reused by later calls (`max_cached_graphs` most recent ones).
    """

    def __init__(
        self, model, processor, max_cached_graphs: int = 2, emulate_graphs: bool = False
    ) -> None:
        """emulate_graphs: take the CUDA-graph path (bucketed static buffers reused across calls,
        full-cache attention, device-side counters) but run the step eagerly instead of
        replaying a graph — for testing that path without a GPU."""
        self.model = model
        self.emulate_graphs = emulate_graphs
        self.processor = processor
        self.arch = arch_of(model)  # base-model specifics (monet_fast.model.arch)
        self.lm = self.arch.language_model(model)
        self.lm_head = model.lm_head
        self._cache_kw = cache_kwarg(self.lm.layers[0])
        layer_types = set(getattr(self.lm.config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise ValueError(
                f"monet_fast.decode supports full-attention layers only, got {sorted(layer_types)}"
            )
        self.max_cached_graphs = max_cached_graphs
        self._graphs: OrderedDict[tuple, _Runner] = OrderedDict()
        self._graph_weights: tuple | None = None  # weights_fingerprint the graphs were made on

    @property
    def embed_weight(self) -> torch.Tensor:
        # Looked up each time: the embedding module may be replaced (resize, reload).
        return self.arch.input_embeddings(self.model).weight

    # ------------------------------------------------------------------ public

    def generate(
        self,
        inputs: list,
        *,
        max_new_tokens: int,
        logits_processor: LogitsProcessor | None = None,
        streamer: Streamer | None = None,
        latent_transform: LatentTransform | None = None,
        hide_latents: bool = False,
        **options,
    ) -> GenerateOutput:
        """See `monet_fast.decode.generate`."""
        if latent_transform is not None or hide_latents:
            # Interventions run in Python between steps: no graph capture.
            options["use_cuda_graphs"] = False
        cfg = resolve_config(self.model, self.processor, max_new_tokens=max_new_tokens, **options)
        batch = prepare_batch(self.processor, inputs)
        if cfg.max_blocks == 0 and any(batch.forced_start):
            raise ValueError(
                "a prompt ends with <abs_vis_token> (starts a latent block) but max_latent_blocks=0"
            )
        intervention = None
        if latent_transform is not None or hide_latents:
            intervention = _Intervention(transform=latent_transform, hide=hide_latents)
        with torch.inference_mode():
            # latent.feedback_norm: target norm read once per call, into one persistent tensor.
            self._feedback = FeedbackNorm.refreshed(getattr(self, "_feedback", None), self.model)
            return self._generate(batch, cfg, logits_processor, streamer, intervention)

    # --------------------------------------------------------------- internals

    def _use_graphs(self, cfg: DecodeConfig) -> bool:
        return cfg.use_cuda_graphs and (self.model.device.type == "cuda" or self.emulate_graphs)

    def _eager_runner(self, cfg: DecodeConfig, batch: int, need_len: int) -> _Runner:
        ring = cfg.check_every + 1 if cfg.return_latents else None
        bufs = DecodeBuffers.allocate(self.model, batch, need_len, list(cfg.eos_ids), ring)
        gen = None
        if cfg.do_sample and cfg.seed is not None:
            gen = torch.Generator(device=self.model.device).manual_seed(cfg.seed)
        return _Runner(bufs=bufs, generator=gen)

    def _runner(self, cfg: DecodeConfig, batch: int, need_len: int, processor) -> _Runner:
        if not self._use_graphs(cfg):
            return self._eager_runner(cfg, batch, need_len)

        from monet_fast.decode.graphs import (
            EagerStep,
            capture_decode_step,
            make_graph_generator,
            weights_fingerprint,
        )

        ring = cfg.check_every + 1 if cfg.return_latents else None
        device = self.model.device
        # A graph holds the addresses of the weights it was captured on: after model.to(dtype or
        # device), a reload or any other change of a parameter's storage, replaying it would read
        # freed memory. Such a change drops every graph (and its KV cache) before capturing anew.
        # In-place updates (optimizer steps) keep the storage, so the graphs stay valid.
        weights = weights_fingerprint(self.model)
        if weights != self._graph_weights:
            self._graphs.clear()
            self._graph_weights = weights
        bucket = batch_bucket(batch)
        max_len = _round_up(need_len, _GRAPH_LEN_MULTIPLE)
        # Everything else baked into the captured kernels is part of the key.
        key = (
            bucket,
            max_len,
            ring,
            cfg.do_sample,
            cfg.top_p < 1.0,
            cfg.layout,
            cfg.latent_size,
            cfg.start_id,
            cfg.end_id,
            cfg.slot_id,
            cfg.fill_id,
            cfg.eos_ids,
            cfg.max_blocks,
            # The runner's step closure keeps the processor alive, so its id is not reused.
            id(processor) if processor is not None else None,
        )
        runner = self._graphs.get(key)
        if runner is None:
            if processor is not None:
                vocab = self.lm_head.weight.shape[0]
                problem = check_logits_processor(processor, bucket, vocab, device)
                if problem is not None:
                    warnings.warn(
                        f"logits_processor is not CUDA-graph safe: it {problem}. Decoding "
                        "without CUDA graphs (same results, slower); see LogitsProcessor in "
                        "monet_fast.decode.graph_safety for the contract.",
                        GraphUnsafeProcessorWarning,
                        stacklevel=4,
                    )
                    return self._eager_runner(cfg, batch, need_len)
            while len(self._graphs) >= self.max_cached_graphs:
                self._graphs.popitem(last=False)  # free the oldest graph and its KV cache
            bufs = DecodeBuffers.allocate(self.model, bucket, max_len, list(cfg.eos_ids), ring)
            gen = make_graph_generator(device) if cfg.do_sample else None
            runner = _Runner(bufs=bufs, generator=gen)

            def step() -> None:
                self._decode_step(runner.bufs, cfg, processor, runner.generator, None)

            if device.type == "cuda":
                runner.graph = capture_decode_step(step, [gen] if gen is not None else [])
            else:  # emulate_graphs
                runner.graph = EagerStep(step, device, lambda: weights_fingerprint(self.model))
            self._graphs[key] = runner
        else:
            self._graphs.move_to_end(key)
        if cfg.do_sample:
            seed = cfg.seed if cfg.seed is not None else int(torch.randint(2**62, ()).item())
            if runner.generator is not None:
                runner.generator.manual_seed(seed)
            elif device.type == "cuda":  # this torch cannot register a private generator
                torch.cuda.manual_seed(seed)
            else:
                runner.generator = torch.Generator(device=device).manual_seed(seed)
        return runner

    def _generate(
        self,
        batch: PreparedBatch,
        cfg: DecodeConfig,
        processor: LogitsProcessor | None,
        streamer: Streamer | None,
        intervention: _Intervention | None = None,
    ) -> GenerateOutput:
        n_rows, prompt_len = batch.input_ids.shape
        offsets = [1 if f else 0 for f in batch.forced_start]
        # Emissions: max_new_tokens output tokens, plus the forced START some rows do not output.
        n_emit = cfg.max_new_tokens + max(offsets)
        runner = self._runner(cfg, n_rows, prompt_len + n_emit, processor)
        bufs = runner.bufs
        if intervention is not None and intervention.hide:
            intervention.latent_cols = torch.zeros(
                bufs.mask.shape[0], bufs.mask.shape[-1], dtype=torch.bool, device=bufs.mask.device
            )
        self._prefill(bufs, batch, cfg, offsets, processor, runner.generator, intervention)

        hidden_size = self.embed_weight.shape[1]
        tokenizer = self.processor.tokenizer
        host = HostView(tokenizer, hidden_size, bufs, cfg, n_rows, offsets, streamer)
        last = 0  # index of the newest emission
        # The host looks at the device state only here, every check_every steps.
        while not host.check(last) and last < n_emit - 1:
            n = min(cfg.check_every, n_emit - 1 - last)
            for i in range(n):
                if runner.graph is not None:
                    runner.graph.replay()
                else:
                    # Cache columns in use after this step: prompt + emissions 0..last+i.
                    view_len = prompt_len + last + i + 1
                    self._decode_step(
                        bufs, cfg, processor, runner.generator, view_len, intervention
                    )
            last += n
        return host.collect()

    def _prefill(
        self,
        bufs: DecodeBuffers,
        batch: PreparedBatch,
        cfg: DecodeConfig,
        offsets: list[int],
        processor: LogitsProcessor | None,
        generator: torch.Generator | None,
        intervention: _Intervention | None = None,
    ) -> None:
        """Run the prompts, reset every state buffer in place, and make emission 0."""
        device = self.model.device
        n_rows, prompt_len = batch.input_ids.shape
        dtype = bufs.mask.dtype
        min_value = torch.finfo(dtype).min
        visual, positions, mask, valid = self.prompt_inputs(batch, dtype)
        embeds = visual.embeds

        bufs.cache.prefill = True
        try:
            states = self.text_forward(embeds, positions, mask, bufs.cache, visual.deepstack)
        finally:
            bufs.cache.prefill = False
        hidden = torch.zeros(bufs.batch, embeds.shape[-1], dtype=dtype, device=device)
        hidden[:n_rows] = states[:, -1]  # left padding: the last column is the last real token

        # Reset every state buffer in place (the addresses are baked into captured graphs).
        bufs.mask.fill_(min_value)
        bufs.mask[:n_rows, 0, 0, :prompt_len].masked_fill_(valid, 0.0)
        bufs.base_pos.zero_()
        bufs.base_pos[:n_rows] = positions.amax(dim=(0, 2)) + 1
        bufs.step.zero_()
        bufs.cache.write_pos.fill_(prompt_len)
        bufs.offset.zero_()
        bufs.offset[:n_rows] = torch.tensor(offsets, device=device)
        bufs.mode.fill_(_ops.MODE_DONE)  # rows past n_rows (bucket padding) never run
        bufs.mode[:n_rows] = _ops.MODE_TEXT
        bufs.count.zero_()
        bufs.n_blocks.zero_()
        bufs.remaining.zero_()
        bufs.remaining[:n_rows] = torch.tensor(offsets, device=device) + cfg.max_new_tokens
        bufs.out_ids.fill_(cfg.fill_id)
        bufs.out_fed.zero_()
        bufs.temperature.fill_(cfg.temperature)
        bufs.top_p.fill_(cfg.top_p)
        force = torch.zeros(bufs.batch, dtype=torch.bool, device=device)
        force[:n_rows] = torch.tensor(batch.forced_start, device=device)
        self._select(
            bufs, hidden, cfg, processor, generator, force=force, intervention=intervention
        )

    def prompt_inputs(self, batch: PreparedBatch, dtype: torch.dtype):
        """(visual features, mRoPE positions [3, B, P], additive causal mask [B, 1, P, P] that
        hides padding, valid [B, P] bool) for the prefill forward of a padded prompt batch."""
        model, device = self.model, self.model.device
        width = batch.input_ids.shape[1]
        visual = self.arch.embed(model, batch.input_ids, batch.pixel_values, batch.image_grid_thw)
        positions = self.arch.rope_index(
            batch.input_ids,
            batch.mm_token_type_ids,
            batch.image_grid_thw,
            batch.attention_mask,
            spatial_merge_size=self.arch.spatial_merge_size(model),
        ).to(device)
        valid = batch.attention_mask.to(device).bool()  # [B, P]
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        allowed = causal.unsqueeze(0) & valid.unsqueeze(1)  # [B, P(query), P(key)]
        mask = torch.zeros(len(valid), 1, width, width, dtype=dtype, device=device)
        mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)
        return visual, positions, mask, valid

    def text_forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache,
        deepstack: DeepstackFeatures | None = None,
    ) -> torch.Tensor:
        """The text model's forward, layer by layer: [B, L, H] -> final post-norm states.

        Same modules and math as `language_model(inputs_embeds=..., position_ids=...,
        attention_mask=mask, cache=...)` (rotary embedding -> decoder layers -> final RMSNorm,
        tested equal), but calling the layers directly skips the model-level wrappers (config
        merging, output capturing, mask construction): a third of a small model's CPU step.
        positions: [3, B, L] mRoPE ids; mask: [B, 1, L, S] additive float. deepstack: per-layer
        visual features of the prompt (Qwen3-VL), added after the layers as the stock model does.
        """
        position_embeddings = self.lm.rotary_emb(embeds, positions)
        states = embeds
        for i, layer in enumerate(self.lm.layers):
            states = layer(
                states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                use_cache=True,
                **{self._cache_kw: cache},
            )
            if deepstack is not None:
                states = self.arch.after_layer(i, states, deepstack)
        return self.lm.norm(states)

    def _decode_step(
        self,
        bufs: DecodeBuffers,
        cfg: DecodeConfig,
        processor: LogitsProcessor | None,
        generator: torch.Generator | None,
        view_len: int | None,
        intervention: _Intervention | None = None,
    ) -> None:
        """One decode step for every row, touching only `bufs` (CUDA-graph capturable).

        view_len: eager mode's number of cache columns in use (None in graph mode: full buffers,
        the mask hides the unwritten columns).
        """
        rows = bufs.batch
        # The token fed now is emission `step`; its position is the row's base + step.
        positions = (bufs.base_pos + bufs.step).view(1, rows, 1).expand(3, rows, 1)
        if view_len is None:  # graph mode: the column to open is only known on the device
            bufs.mask.index_fill_(3, bufs.cache.write_pos.view(1), 0.0)
            mask = bufs.mask
        else:
            bufs.mask[..., view_len - 1] = 0.0
            mask = bufs.mask[..., :view_len]
        bufs.cache.view_len = view_len
        states = self.text_forward(bufs.next_embeds.unsqueeze(1), positions, mask, bufs.cache)
        if intervention is not None and intervention.hide:
            # The column just written holds a latent iff the input was a fed-back vector.
            intervention.latent_cols[:, view_len - 1] = bufs.use_hidden
        bufs.cache.write_pos.add_(1)
        bufs.step.add_(1)
        self._select(bufs, states[:, -1], cfg, processor, generator, intervention=intervention)
        if intervention is not None and intervention.hide:
            closed = intervention.latent_cols & (bufs.mode != _ops.MODE_LATENT).view(-1, 1)
            bufs.mask[:, 0, 0].masked_fill_(closed, torch.finfo(bufs.mask.dtype).min)

    def _select(
        self,
        bufs: DecodeBuffers,
        hidden: torch.Tensor,
        cfg: DecodeConfig,
        processor: LogitsProcessor | None,
        generator: torch.Generator | None,
        force: torch.Tensor | None = None,
        intervention: _Intervention | None = None,
    ) -> None:
        """LM head -> sampling -> latent_step for emission index `bufs.step`.

        hidden: [B, H] final post-norm hidden states of the positions just run.
        """
        logits = self.lm_head(hidden).float()  # [B, V]
        hidden = self._feedback(hidden)  # what a latent step feeds back (identity for "none")
        if cfg.max_blocks != NO_BLOCK_CAP:
            # A row at its block cap cannot open another block: START is masked out of its text
            # steps (inside a monet_vllm block START is only a placeholder, left untouched).
            capped = (bufs.n_blocks >= cfg.max_blocks) & (bufs.mode == _ops.MODE_TEXT)
            logits[:, cfg.start_id] = logits[:, cfg.start_id].masked_fill(capped, float("-inf"))
        if processor is not None:
            logits = processor(logits, bufs.step - bufs.offset)
        top_p = bufs.top_p if cfg.top_p < 1.0 else None
        sampled = sample_tokens(logits, cfg.do_sample, bufs.temperature, top_p, generator)
        if force is not None:
            sampled = torch.where(force, cfg.start_id, sampled)
        if intervention is not None and intervention.transform is not None:
            # Only rows whose next input is this vector use it; the index is its place in the
            # row's latent trace (vectors fed so far).
            index = bufs.out_fed[:, : int(bufs.step) + 1].sum(1) if int(bufs.step) >= 0 else None
            hidden = intervention.transform(hidden, index).to(hidden.dtype)
        _ops.latent_step(
            sampled,
            hidden,
            self.embed_weight,
            bufs.eos_ids,
            bufs.mode,
            bufs.count,
            bufs.n_blocks,
            bufs.remaining,
            bufs.emit_ids,
            bufs.use_hidden,
            bufs.next_embeds,
            _ops.LAYOUT_IDS[cfg.layout],
            cfg.latent_size,
            cfg.start_id,
            cfg.end_id,
            cfg.slot_id,
            cfg.fill_id,
            cfg.max_blocks,
        )
        column = bufs.step.view(1)
        bufs.out_ids.index_copy_(1, column, bufs.emit_ids.view(-1, 1))
        bufs.out_fed.index_copy_(1, column, bufs.use_hidden.view(-1, 1))
        if bufs.ring is not None:
            slot = torch.remainder(bufs.step, bufs.ring.shape[0]).view(1)
            bufs.ring.index_copy_(0, slot, hidden.unsqueeze(0).to(bufs.ring.dtype))


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model, processor) -> LatentDecoder:
    """The cached LatentDecoder of `model` (graphs survive across generate() calls); a peft
    wrapper decodes through its base model, which runs with the adapters."""
    from monet_fast.model.unwrap import unwrap

    model = unwrap(model)
    decoder = _DECODERS.get(model)
    if decoder is None or decoder.processor is not processor:
        decoder = LatentDecoder(model, processor)
        _DECODERS[model] = decoder
    return decoder


def generate(
    model,
    processor,
    inputs: list,
    *,
    max_new_tokens: int,
    latent_size: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    return_latents: bool = False,
    latent_layout: str | None = None,
    max_latent_blocks: int | None = None,
    stop_strings: Sequence[str] | str | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    use_cuda_graphs: bool = True,
    check_every: int = DEFAULT_CHECK_EVERY,
    logits_processor: LogitsProcessor | None = None,
    streamer: Streamer | None = None,
    latent_transform: LatentTransform | None = None,
    hide_latents: bool = False,
) -> GenerateOutput:
    """Decode a batch with latent feedback.

    Args:
        model: a Qwen2.5-VL or Qwen3-VL model (e.g. from `monet_fast.model.loading`).
        processor: its processor (MonetProcessor or an HF Qwen2.5-VL processor).
        inputs: a list of chat conversations (HF messages, images as PIL images or paths) or of
            templated prompts `{"text": str, "images": [...]}`; a prompt ending with
            `<abs_vis_token>` starts in latent mode.
        max_new_tokens: tokens to generate per input, latent steps and forced tokens included.
        latent_size: K, latent steps per block; default: the model config's `latent_size`.
        latent_layout: "sft" or "monet_vllm"; default: the model config's `latent_layout`.
        do_sample, temperature, top_p, seed: sampling (greedy by default); `seed` makes sampling
            reproducible for a given batch.
        return_latents: also return every fed-back latent vector, per input and block.
        max_latent_blocks: latent blocks a sequence may open (START is masked beyond it).
        stop_strings: stop a sequence once its text contains one (checked every check_every).
        eos_token_id: stop ids; default: generation_config.eos_token_id.
        use_cuda_graphs: capture/replay the decode step on CUDA (ignored on CPU). Falls back to
            eager decoding, with a `GraphUnsafeProcessorWarning`, when logits_processor is not
            graph-safe (make it an error with `warnings.simplefilter("error", ...)`).
        check_every: decode steps between host checks (finished rows, stop strings, streaming).
        logits_processor: `fn(logits [B, V] float32, index [B] int64) -> logits [B, V]`, applied
            before sampling; index is the row's output index of the token being sampled (-1 for
            a START forced by the prompt). With CUDA graphs it is recorded once with the step and
            replayed, so it must be graph-safe: pure tensor ops on the logits' device, no
            `.item()`/`.tolist()`/`bool()` of a tensor, no Python branching on tensor values, no
            boolean-mask indexing or other value-dependent shapes (`nonzero`, `masked_select`),
            no copies to the host, no `torch.tensor(...)` per call; B is then the batch bucket.
            Use e.g. `logits[:, tok] += (index == i) * bonus`, `torch.where`, `masked_fill`,
            `index_fill`, `scatter`. It is checked before capture (`graph_safety.py`; it runs
            once eagerly, then under a host-sync detector).
        streamer: `fn(row, new_ids)` called at each host check with the new output tokens.
        latent_transform: `fn(vectors [B, H], trace_index [B]) -> [B, H]` replaces every fed-back
            latent (interventions such as zero / noise / shuffle); decodes without CUDA graphs.
        hide_latents: mask each latent block's slots from every token after the block.

    Greedy results do not depend on the batch composition (up to floating-point ties).
    """
    return decoder_for(model, processor).generate(
        inputs,
        max_new_tokens=max_new_tokens,
        latent_size=latent_size,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        return_latents=return_latents,
        latent_layout=latent_layout,
        max_latent_blocks=max_latent_blocks,
        stop_strings=stop_strings,
        eos_token_id=eos_token_id,
        use_cuda_graphs=use_cuda_graphs,
        check_every=check_every,
        logits_processor=logits_processor,
        streamer=streamer,
        latent_transform=latent_transform,
        hide_latents=hide_latents,
    )
